"""Continual learning on all-MiniLM-L6-v2: do the spectral signals predict forgetting of earlier tasks?

Shuttleworth et al. 2024 (arXiv 2410.21228) argue that intruder dimensions accumulate when fine-tuning on tasks
in sequence and that forgetting grows with them (v3: it is localised in the intruder directions and grows with
their singular values). Here one LoRA adapter on all linear layers (alpha = 2r) is trained on three generated
tasks in turn (word order, sentiment with negation, topic), each with its own classification head on the
mean-pooled embedding (frozen once its task is done, so forgetting is the encoder's). After each task every task
seen so far is evaluated, and the monitor measures the merged weights. Forgetting after task t is the mean drop in
accuracy on tasks 1..t-1 since each was learned.

Across configurations (LoRA rank 1 / 8 / 64 at 0.5, 1, 2 and 4 times its rate in benchmarks/reproduce_paper.py)
and seeds, the Spearman and Pearson correlations of forgetting with each candidate predictor, measured at the same
moment, are computed per seed (spread over seeds) and pooled (bootstrap 95 % interval): the intruder count, the intruder energy share, the intruder sigma ratio, and, as
baselines, the relative size of the update ||dW||_F / ||W0||_F and the embedding drift on unrelated sentences.
Full fine-tuning runs (at the paper's ratio, lr / 15, and 4x that) are reported beside, outside the correlations.
Each task: 800 generated examples x 2 epochs (100 steps of 16), linear schedule with 10 % warm-up.

    PYTHONPATH=$PWD python benchmarks/continual.py --results benchmarks/results/continual.json  # 42 runs, ~53 min
    PYTHONPATH=$PWD python benchmarks/continual.py --seeds 0     # one seed, ~18 min on one CPU thread
    PYTHONPATH=$PWD python benchmarks/continual.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch
from reproduce_paper import LORA_LR
from tasks import (
    ALL_LINEAR,
    TextTask,
    accuracy,
    add_record_options,
    load_records,
    minilm_path,
    order_examples,
    reference_batch,
    save_records,
    sentiment_examples,
    topic_examples,
)
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.forgetting import ForgettingProxy, mean_pooled_last_hidden

TASKS = {"order": order_examples, "sentiment": sentiment_examples, "topic": topic_examples}
PREDICTORS = ("intruders", "energy_share", "sigma_ratio", "update_norm", "drift")
BATCH = 16
RANK_LR = {1: 2 * LORA_LR, 8: LORA_LR, 64: LORA_LR / 2}  # the reproduction's rates (benchmarks/reproduce_paper.py)
LEARNED = 0.75  # a task below this accuracy right after its training was not learned: its forgetting means nothing


@dataclass
class Config:
    rank: int | None  # None: full fine-tuning
    lr: float

    @property
    def name(self) -> str:
        return f"full FT, lr {self.lr:.2g}" if self.rank is None else f"LoRA r={self.rank}, lr {self.lr:.2g}"


class MultiHead(nn.Module):
    """A shared encoder and one linear head per task on its mean-pooled last hidden state; ``task`` selects the
    head, so ``accuracy()`` and the training loop see an ordinary classifier."""

    def __init__(self, encoder: nn.Module, tasks: int, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(tasks))
        self.task = 0

    def forward(self, input_ids, attention_mask, labels=None) -> SequenceClassifierOutput:
        pooled = mean_pooled_last_hidden(self.encoder, {"input_ids": input_ids, "attention_mask": attention_mask})
        logits = self.heads[self.task](pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build(config: Config, seed: int) -> tuple[MultiHead, SpectralMonitor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)  # heads and LoRA A from the seed
    encoder = AutoModel.from_pretrained(minilm_path())
    if config.rank is None:
        monitor = SpectralMonitor(encoder, mode="full", include=ALL_LINEAR + "$", progress=False)
    else:
        lora = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=ALL_LINEAR, lora_dropout=0.0)
        encoder = get_peft_model(encoder, lora)
        monitor = SpectralMonitor(encoder, progress=False)
    monitor.snapshot()
    return MultiHead(encoder, len(TASKS), encoder.config.hidden_size), monitor


@torch.no_grad()
def relative_update_norm(monitor: SpectralMonitor) -> float:
    """``sqrt(sum ||dW||_F^2 / sum ||W0||_F^2)`` over the monitored matrices: how far the weights moved at all."""
    update = base = 0.0
    for matrix in monitor.matrices:
        sv = matrix.update_singular_values(torch.device("cpu"))
        update += 0.0 if sv is None else float((sv.double() ** 2).sum())
        base += float(matrix.base_weight().double().pow(2).sum())
    return math.sqrt(update / base)


def train_task(model: MultiHead, task: int, data: TextTask, lr: float, steps: int, seed: int) -> None:
    """AdamW on the encoder's trainable weights and this task's head, linear schedule with 10 % warm-up."""
    from transformers import get_linear_schedule_with_warmup

    model.task = task
    params = [p for p in model.encoder.parameters() if p.requires_grad] + list(model.heads[task].parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    order = random.Random(seed)
    indices: list[int] = []
    model.train()
    for _ in range(steps):
        if len(indices) < BATCH:
            indices = list(range(len(data)))
            order.shuffle(indices)
        batch = [indices.pop() for _ in range(BATCH)]
        out = model(**{k: v[batch] for k, v in data.enc.items()}, labels=data.labels[batch])
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    for p in model.heads[task].parameters():
        p.requires_grad_(False)  # done: later tasks must not move it (forgetting is then the encoder's)


def run_sequence(config: Config, seed: int, tokenizer, train_size: int, epochs: int, eval_size: int) -> dict:
    """Train the tasks in turn; after each, accuracy on every task so far and the spectral signals."""
    model, monitor = build(config, seed)
    names = list(TASKS)
    train_sets = [TextTask(tokenizer, TASKS[n](train_size, seed=100 * seed + i)) for i, n in enumerate(names)]
    eval_sets = [TextTask(tokenizer, TASKS[n](eval_size, seed=10_000 + i)) for i, n in enumerate(names)]
    proxy = ForgettingProxy(reference_batch(tokenizer), base="first_call")
    proxy(model.encoder)  # the base model's embeddings
    steps = epochs * train_size // BATCH
    after: list[dict] = []
    for t, name in enumerate(names):
        train_task(model, t, train_sets[t], config.lr, steps, seed)
        accs = []
        for i in range(t + 1):
            model.task = i
            accs.append(accuracy(model, eval_sets[i]))
        report = monitor.measure(step=t)
        assert report is not None  # None only on a non-main rank of a sharded model
        after.append(
            {
                "task": name,
                "accuracy": accs,
                "intruders": report.intruders_total,
                "energy_share": report.intruder_energy_share,
                "sigma_ratio": report.intruder_sigma_ratio,
                "first": report.first_intruder,
                "update_norm": relative_update_norm(monitor),
                "drift": 1 - proxy(model.encoder)["spectral/forgetting/embedding_cosine"],
            }
        )
    learned = [after[i]["accuracy"][i] for i in range(len(names))]
    for t in range(1, len(names)):
        after[t]["forgetting"] = statistics.fmean(learned[i] - after[t]["accuracy"][i] for i in range(t))
    return {"config": config.name, "rank": config.rank, "lr": config.lr, "seed": seed, "after": after}


def learned(record: dict) -> bool:
    """Whether every task reached ``LEARNED`` accuracy right after its own training (else: diverged or too slow)."""
    return all(a["accuracy"][i] >= LEARNED for i, a in enumerate(record["after"]))


def points(records: list[dict]) -> list[dict]:
    """One (forgetting, predictors) point per run and task transition (after task 2, after task 3), from runs that
    learned every task."""
    return [{"seed": r["seed"], **a} for r in records if learned(r) for a in r["after"] if "forgetting" in a]


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2  # ties share their mean rank
        i = j + 1
    return ranks


def pearson(x: list[float], y: list[float]) -> float:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan  # a constant has no correlation
    return statistics.correlation(x, y)


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


@dataclass
class Correlation:
    per_seed: list[float]  # one value per seed (NaN where a predictor was constant within that seed)
    pooled: float
    interval: tuple[float, float]  # bootstrap 95 % interval of the pooled value (NaN if undefined)


def correlations(
    pts: list[dict], resamples: int = 2000, seed: int = 0, predictors: tuple[str, ...] = PREDICTORS
) -> dict[str, Correlation]:
    """Per predictor and kind: per-seed correlations (mean, sd), pooled value and its bootstrap 95 % interval
    (resampling points)."""
    seeds = sorted({p["seed"] for p in pts})
    rng = random.Random(seed)
    boot = [[rng.randrange(len(pts)) for _ in pts] for _ in range(resamples)]
    forgetting = [p["forgetting"] for p in pts]
    out: dict[str, Correlation] = {}
    for name in predictors:
        x = [p[name] for p in pts]
        for kind, corr in (("spearman", spearman), ("pearson", pearson)):
            per_seed = [
                corr([p[name] for p in pts if p["seed"] == s], [p["forgetting"] for p in pts if p["seed"] == s])
                for s in seeds
            ]
            samples = sorted(
                v for v in (corr([x[i] for i in b], [forgetting[i] for i in b]) for b in boot) if not math.isnan(v)
            )
            interval = (
                (samples[int(0.025 * len(samples))], samples[int(0.975 * len(samples)) - 1])
                if samples
                else (math.nan, math.nan)
            )
            out[f"{name}/{kind}"] = Correlation(per_seed, corr(x, forgetting), interval)
    return out


def report(records: list[dict]) -> str:
    lora = [r for r in records if r["rank"] is not None]
    full = [r for r in records if r["rank"] is None]
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"Per configuration, mean ± sd over seeds {seeds}: forgetting after task 2 / after task 3 (mean accuracy drop "
        "on earlier tasks, 0.1 = 10 points) and the signals after task 3:",
        "",
        "| configuration | final acc. (order, sentiment, topic) | forgetting after 2 | after 3 | intruders | "
        "energy share | σ ratio | ‖ΔW‖/‖W0‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_config: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["lr"])):
        by_config.setdefault(r["config"], []).append(r)

    def cell(values: list[float], digits: int) -> str:
        sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.{digits}f}{sd}"

    for name, rs in by_config.items():
        last = [r["after"][-1] for r in rs]
        final = ", ".join(f"{statistics.fmean(a['accuracy'][i] for a in last):.2f}" for i in range(len(TASKS)))
        lines.append(
            f"| {name} | {final} | {cell([r['after'][1]['forgetting'] for r in rs], 3)} | "
            f"{cell([a['forgetting'] for a in last], 3)} | {cell([a['intruders'] for a in last], 1)} | "
            f"{cell([a['energy_share'] for a in last], 3)} | {cell([a['sigma_ratio'] for a in last], 2)} | "
            f"{cell([a['update_norm'] for a in last], 3)} |"
        )
    pts = points(lora)
    corr = correlations(pts)
    dropped = [f"{r['config']} seed {r['seed']}" for r in lora if not learned(r)]
    lines += [
        "",
        f"Correlation with forgetting over LoRA runs that learned every task (accuracy ≥ {LEARNED} right after it; "
        f"left out: {', '.join(dropped) or 'none'}): {len(pts)} points (runs × 2 transitions), per-seed mean ± sd "
        "and pooled with a bootstrap 95 % interval",
        "",
        "| predictor | Spearman per seed | Spearman pooled [95 % CI] | Pearson per seed | Pearson pooled [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for name in PREDICTORS:
        cells = []
        for kind in ("spearman", "pearson"):
            c = corr[f"{name}/{kind}"]
            per_seed = [v for v in c.per_seed if not math.isnan(v)]
            cells.append(cell(per_seed, 2) if per_seed else "n/a")
            cells.append(f"{c.pooled:.2f} [{c.interval[0]:.2f}, {c.interval[1]:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    quiet = [p["forgetting"] for p in pts if p["intruders"] == 0]
    loud = [p["forgetting"] for p in pts if p["intruders"] > 0]
    if quiet and loud:
        lines += [
            "",
            f"Points without any intruder: {len(quiet)}, mean forgetting {statistics.fmean(quiet):.3f} "
            f"({sum(f > 0.1 for f in quiet)} forgot more than 10 points); with intruders: {len(loud)}, mean "
            f"forgetting {statistics.fmean(loud):.3f}.",
        ]
    if full:
        lines += ["", f"Full fine-tuning ({len(full)} runs) is in the first table, outside the correlations."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps, two configurations, one seed")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--lr-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="times each rank's reproduction rate"
    )
    parser.add_argument(
        "--full-lr", type=float, nargs="*", default=[LORA_LR / 15, 4 * LORA_LR / 15], help="full fine-tuning runs"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-size", type=int, default=512)
    add_record_options(parser)
    opts = parser.parse_args()
    if opts.quick:
        opts.ranks, opts.lr_scales, opts.full_lr, opts.seeds = [8], [1.0, 2.0], [], opts.seeds[:1]
        opts.train_size, opts.epochs, opts.eval_size = 64, 1, 64
    torch.set_num_threads(opts.threads)
    records = load_records(opts.results)
    start = time.perf_counter()
    if not opts.table_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        configs = [Config(r, RANK_LR[r] * k) for r in opts.ranks for k in opts.lr_scales]
        configs += [Config(None, lr) for lr in opts.full_lr]
        done = {(r["config"], r["seed"]) for r in records}
        for seed in opts.seeds:
            for config in configs:
                if (config.name, seed) in done:
                    continue
                t0 = time.perf_counter()
                records.append(run_sequence(config, seed, tokenizer, opts.train_size, opts.epochs, opts.eval_size))
                a = records[-1]["after"]
                print(
                    f"{config.name}, seed {seed}: accuracies {[round(x, 3) for x in a[-1]['accuracy']]}, "
                    f"forgetting {a[1]['forgetting']:.3f} / {a[2]['forgetting']:.3f}, intruders "
                    f"{[x['intruders'] for x in a]}, σ ratio {a[-1]['sigma_ratio']:.2f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                save_records(opts.results, records)
    print(
        f"\nall-MiniLM-L6-v2, tasks {' → '.join(TASKS)}, {opts.train_size} examples × {opts.epochs} epochs each, "
        f"batch {BATCH}, LoRA on all linear layers, α = 2r\n"
    )
    print(report(records))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
