"""Shared by the scripts test_distributed.py runs under torchrun (they put tests/ on sys.path first): the tiny
models, the measurement counters, and the phases whose numbers rank 0 checks against a float64 recount."""

from __future__ import annotations

import copy
import json
import os
import sys

from helpers import recount_run, tiny_bert
from peft import LoraConfig, get_peft_model

from lora_spectral_callback import LoRASpectralCallback

EPS = [0.5, 0.7]


def lora_tiny_bert():
    """Tiny BERT with LoRA on query/value (B = 0 at init: the merged weights start as the pretrained ones)."""
    return get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))


def stop_rule_callback(callback_class, log_dir: str, **options):
    """The callback every 2-process LoRA run uses: measured every 2 steps, a stop as soon as any intruder appears,
    TensorBoard in ``log_dir``; ``options`` add to it."""
    return callback_class(every_n_steps=2, max_intruders=0, epsilon=EPS, log_dir=log_dir, progress=False, **options)


def record_measurements(monitor, measured: list) -> None:
    """Append ``(step, returned a report)`` to ``measured`` at every measurement on this rank (rank 0 alone
    should get the reports)."""
    inner = monitor.measure

    def measure(step=None):
        report = inner(step)
        measured.append((step, report is not None))
        return report

    monitor.measure = measure


class Counting(LoRASpectralCallback):
    """Records every measure call on this rank and whether it returned a report (rank 0 only should)."""

    measured: list

    def on_train_begin(self, args, state, control, **kwargs):
        self.measured = []
        first = self.monitor is None
        result = super().on_train_begin(args, state, control, **kwargs)
        if first:
            record_measurements(self.monitor, self.measured)
        return result


def tiny_trainer(output_dir: str, model, callback, steps: int, lr: float, **args):
    """The Trainer every 2-process script runs: 128 random token sequences, 4 per device, seed 42; ``args`` add
    to the TrainingArguments."""
    from helpers import RandomTokens
    from training import make_trainer

    options = dict(data=RandomTokens(n=128), per_device_train_batch_size=4, learning_rate=lr, seed=42)
    return make_trainer(output_dir, model, [callback], steps, **options, **args)


def measured_phase(mode: str, pretrained, callback, steps: int, lr: float, train, rank: int) -> dict:
    """``train(model, callback, steps, lr) -> (result, final_state)`` on a copy of ``pretrained``; the result gets
    this rank's SVD count and, on rank 0, the float64 recount of the gathered final weights (``recount_run``)."""
    result, final = train(copy.deepcopy(pretrained), callback, steps, lr)
    result["svds"] = callback.monitor.snapshots.store.computed
    if rank == 0:
        result.update(recount_run(mode, pretrained, final, callback, EPS))
    return result


def full_phase(callback_class, out: str, train, rank: int) -> dict:
    """Full fine-tuning mode as every sharding script runs it: a plain tiny BERT's query/value weights measured
    every 2 steps (strict, TensorBoard in ``out/tb-full``), 4 steps at lr 1e-2."""
    pretrained = tiny_bert(hidden=64)
    callback = callback_class(
        every_n_steps=2,
        epsilon=EPS,
        include=r"query|value",
        mode="full",
        log_dir=os.path.join(out, "tb-full"),
        progress=False,
        strict=True,
    )
    return measured_phase("full", pretrained, callback, 4, 1e-2, train, rank)


def count_owner_gathers(name: str) -> list:
    """Record every gather onto one owner (``lora_spectral_callback.sharding.<name>``) this rank takes part in."""
    from lora_spectral_callback import sharding

    calls: list = []
    real = getattr(sharding, name)

    def counted(t, rank):
        calls.append(rank)
        return real(t, rank)

    setattr(sharding, name, counted)
    return calls


def finish(results: dict, path: str) -> None:
    """End a rank: write its ``results`` (JSON) to ``path``, destroy the process group, and leave without
    interpreter teardown. A rank sometimes aborted in teardown ("terminate called without an active exception",
    about 1 run in 10-30, the DDP and ZeRO-3 scripts) after its results were written; a thread still inside C++ code
    when the interpreter finalizes is forced to unwind there, which is the suspected cause (not proven)."""
    import torch.distributed as dist

    with open(path, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
