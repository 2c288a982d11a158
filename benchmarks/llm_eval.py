"""Evaluation for benchmarks/llm_forgetting.py: the self-distillation forgetting set and the new-knowledge task.

Forgetting is the increase of the mean negative log-likelihood per answer token on ~100 general prompts whose
answers are the *base model's own* greedy answers. The base model assigns those tokens high probability by
construction, so any rise is a change of the model's own behaviour on general requests, not a disagreement with
some external reference it never matched; it needs no labels, covers open-ended instructions (not only
multiple-choice facts) and is cheap (one forward pass per batch, no generation). The set is generated once and
stored (`benchmarks/data/smollm2_self_distill.json`) so every run is scored against the same tokens.

Task accuracy is teacher-forced: on questions phrased in templates the training data never uses, the fraction of
invented countries whose capital tokens are all the model's argmax given the answer prefix
"The capital of X is". One forward pass; exact-match of a greedy generation would need ~24 decoding steps.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from sft_smollm2 import SYSTEM

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smollm2_self_distill.json")
HELD_OUT_QUESTIONS = ["Tell me the capital of {c}.", "What city serves as the capital of {c}?"]
ANSWER = "The capital of {c} is {capital}."

_TOPICS = [
    "photosynthesis",
    "gravity",
    "the water cycle",
    "inflation",
    "democracy",
    "a black hole",
    "vaccines",
    "the internet",
    "recycling",
    "a volcano",
    "the Roman Empire",
    "electricity",
    "climate change",
    "DNA",
    "a rainbow",
    "friction",
    "the stock market",
    "sleep",
    "a computer program",
    "the moon",
]
_TASKS = ["Give one tip for {x}.", "Why is {x} important?", "Write one sentence about {x}."]
_ACTIVITIES = [
    "learning a language",
    "saving money",
    "staying healthy",
    "studying for an exam",
    "cooking rice",
    "writing an email",
    "running a marathon",
    "growing tomatoes",
    "public speaking",
    "traveling abroad",
]
_FACTS = ["What is the capital of {x}?", "What language is spoken in {x}?"]
_COUNTRIES = ["France", "Japan", "Brazil", "Egypt", "Canada", "India", "Italy", "Kenya", "Mexico", "Norway"]


def general_prompts() -> list[str]:
    """100 general requests: 40 explanations, 30 tips/opinions/sentences, 20 facts about real countries, 10
    arithmetic questions. Fixed text, no randomness."""
    explain = [f"Explain {t} in simple words." for t in _TOPICS] + [f"What is {t}?" for t in _TOPICS]
    tasks = [task.format(x=a) for task, a in itertools.product(_TASKS, _ACTIVITIES)]
    facts = [fact.format(x=c) for fact, c in itertools.product(_FACTS, _COUNTRIES)]
    maths = [f"What is {a} plus {b}?" for a, b in zip(range(3, 13), range(17, 97, 8), strict=True)]
    return explain + tasks + facts + maths


def chat_prefix(tokenizer, question: str) -> list[int]:
    """Token ids of the system and user turns plus the assistant header, as the model is prompted."""
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))


@torch.no_grad()
def make_self_distill_set(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[dict]:
    """The base model's greedy answer (token ids, up to ``max_new_tokens``) to each prompt, one at a time (no
    padding, so the answer is exactly what the model says to that prompt alone)."""
    rows = []
    for question in prompts:
        prefix = torch.tensor([chat_prefix(tokenizer, question)])
        out = model.generate(
            prefix, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
        ids = out[0, prefix.shape[1] :].tolist()
        rows.append({"prompt": question, "answer": tokenizer.decode(ids, skip_special_tokens=True), "answer_ids": ids})
    return rows


def load_self_distill_set(model, tokenizer, path: str = DATA) -> list[dict]:
    """The stored set, made (with ``model``, which must be the base model) and written on first use."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["rows"]
    rows = make_self_distill_set(model, tokenizer, general_prompts())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"made_by": "PYTHONPATH=$PWD python benchmarks/llm_forgetting.py (first run)", "rows": rows}, f)
    return rows


def batches(rows: list[tuple[list[int], list[int]]], batch: int):
    """(input_ids, attention_mask, labels) batches of (prefix, target) pairs, right-padded; labels are -100 except
    on the target tokens."""
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        length = max(len(p) + len(t) for p, t in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (p, t) in enumerate(chunk):
            n = len(p) + len(t)
            ids[j, :n] = torch.tensor(p + t)
            mask[j, :n] = 1
            labels[j, len(p) : n] = torch.tensor(t)
        yield ids, mask, labels


@torch.no_grad()
def answer_nll(model, tokenizer, rows: list[dict], batch: int = 25) -> float:
    """Mean negative log-likelihood per answer token of the stored answers (all tokens weighted equally)."""
    was_training = model.training
    model.eval()
    pairs = sorted(
        ((chat_prefix(tokenizer, r["prompt"]), r["answer_ids"]) for r in rows), key=lambda p: sum(map(len, p))
    )
    total, count = 0.0, 0
    for ids, mask, labels in batches(pairs, batch):  # length-sorted: little padding
        # the vocabulary projection only where a label is: it is ~20 % of the forward pass at every position
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
        target = labels[:, 1:]
        where = target != -100
        logits = model.get_output_embeddings()(hidden[-1][:, :-1][where])
        total += float(torch.nn.functional.cross_entropy(logits, target[where], reduction="sum"))
        count += int(where.sum())
    model.train(was_training)
    return total / count


def task_items(tokenizer, capitals: dict[str, str]) -> list[tuple[list[int], list[int]]]:
    """(prefix incl. "The capital of X is", capital tokens) for each country and held-out question phrasing."""
    items = []
    for (country, capital), question in itertools.product(capitals.items(), HELD_OUT_QUESTIONS):
        full = ANSWER.format(c=country, capital=capital)
        head = ANSWER.format(c=country, capital="").rstrip(". ")
        prefix = chat_prefix(tokenizer, question.format(c=country)) + tokenizer.encode(head, add_special_tokens=False)
        answer = tokenizer.encode(full, add_special_tokens=False)
        head_len = len(tokenizer.encode(head, add_special_tokens=False))
        if answer[:head_len] != prefix[-head_len:]:
            raise ValueError(f"{full!r} does not tokenize with {head!r} as its prefix")
        items.append((prefix, answer[head_len:-1]))  # the capital's tokens (the final "." left out)
    return items


@torch.no_grad()
def task_accuracy(model, items: list[tuple[list[int], list[int]]], batch: int = 32) -> float:
    """Fraction of items whose capital tokens are all the argmax of the model, teacher-forced."""
    was_training = model.training
    model.eval()
    correct = 0
    for ids, mask, labels in batches(items, batch):
        predicted = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        wrong = (predicted != target) & (target != -100)
        correct += int((~wrong.any(dim=1)).sum())
    model.train(was_training)
    return correct / len(items)


def training_examples(tokenizer, capitals: dict[str, str], n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, answer) token pairs from the example's generated chats (training phrasings only)."""
    from sft_smollm2 import chat_dataset

    out = []
    for row in chat_dataset(capitals, n, seed=seed):
        _, user, assistant = row["messages"]
        answer = [*tokenizer.encode(assistant["content"], add_special_tokens=False), tokenizer.eos_token_id]
        out.append((chat_prefix(tokenizer, user["content"]), answer))
    return out
