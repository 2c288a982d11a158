"""Run under torchrun by test_distributed.py: DeepSpeed ZeRO-3 on 2 CPU processes (gloo) with the Trainer, in LoRA
mode (with a stop rule that fires) and in full fine-tuning mode; then ZeRO-2 (nothing partitioned: DDP-like) in
LoRA mode.

``stage3_param_persistence_threshold: 0`` makes ZeRO-3 partition even this tiny model's parameters (by default
parameters under 100k elements stay whole on every rank, and nothing would need gathering). Each rank writes
``zero3_<N>.json`` to argv[1]: what it measured, where it stopped, and, on rank 0, the float64 recount of the
gathered final weights.
"""

import copy
import json
import os
import sys

import deepspeed
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from helpers import RandomTokens, recount_run, tiny_bert

from lora_spectral_callback import LoRASpectralCallback

EPS = [0.5, 0.7]
out = sys.argv[1]
rank = int(os.environ["RANK"])


def zero(stage: int) -> dict:
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,  # the Trainer's torch AdamW: no DeepSpeed CPU Adam to compile
    }


class Counting(LoRASpectralCallback):
    """Records every measure call on this rank and whether it returned a report (rank 0 only should)."""

    measured: list

    def on_train_begin(self, args, state, control, **kwargs):
        self.measured = []
        first = self.monitor is None
        result = super().on_train_begin(args, state, control, **kwargs)
        if first:
            inner = self.monitor.measure

            def measure(step=None):
                report = inner(step)
                self.measured.append((step, report is not None))
                return report

            self.monitor.measure = measure
        return result


def train(model, callback, steps, lr, name, stage=3):
    args = TrainingArguments(
        output_dir=os.path.join(out, name),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        deepspeed=zero(stage),
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=128), callbacks=[callback])
    trainer.train()
    params = list(trainer.model.parameters())
    partitioned = all(p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # every rank: a collective
        final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer, final, partitioned


def lora_phase(stage=3):
    pretrained = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    callback = Counting(
        every_n_steps=2,
        max_intruders=0,
        epsilon=EPS,
        log_dir=os.path.join(out, f"tb-zero{stage}"),
        progress=False,
        strict=True,
        asynchronous=stage == 3,
    )
    trainer, final, partitioned = train(copy.deepcopy(pretrained), callback, 12, 0.3, f"lora{stage}", stage)
    result = {
        "global_step": trainer.state.global_step,
        "measured": callback.measured,
        "partitioned": partitioned,
        "svds": callback.monitor.snapshots.store.computed,
        "asynchronous": callback.asynchronous,
    }
    if rank == 0:
        result.update(recount_run("lora", pretrained, final, callback, EPS))
    return result


def full_phase():
    pretrained = tiny_bert(hidden=64)
    callback = Counting(
        every_n_steps=2,
        epsilon=EPS,
        include=r"query|value",
        mode="full",
        log_dir=os.path.join(out, "tb-full"),
        progress=False,
        strict=True,
    )
    trainer, final, partitioned = train(copy.deepcopy(pretrained), callback, steps=4, lr=1e-2, name="full")
    result = {
        "global_step": trainer.state.global_step,
        "measured": callback.measured,
        "partitioned": partitioned,
        "svds": callback.monitor.snapshots.store.computed,
    }
    if rank == 0:
        result.update(recount_run("full", pretrained, final, callback, EPS))
    return result


results = {
    "rank": rank,
    "world_size": int(os.environ["WORLD_SIZE"]),
    "lora": lora_phase(),
    "full": full_phase(),
    "zero2": lora_phase(stage=2),
}
with open(os.path.join(out, f"zero3_{rank}.json"), "w") as f:
    json.dump(results, f)
deepspeed.comm.destroy_process_group()
