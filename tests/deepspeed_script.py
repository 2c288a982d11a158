"""Run under torchrun by test_distributed.py: DeepSpeed ZeRO-3 on 2 CPU processes (gloo) with the Trainer, in LoRA
mode (with a stop rule that fires) and in full fine-tuning mode; then ZeRO-2 (nothing partitioned: DDP-like) in
LoRA mode.

``stage3_param_persistence_threshold: 0`` makes ZeRO-3 partition even this tiny model's parameters (by default
parameters under 100k elements stay whole on every rank, and nothing would need gathering). Each rank writes
``zero3_<N>.json`` to argv[1]: what it measured, where it stopped, and, on rank 0, the float64 recount of the
gathered final weights.
"""

import functools
import os
import sys

import deepspeed

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import (
    Counting,
    count_owner_gathers,
    finish,
    full_phase,
    lora_tiny_bert,
    measured_phase,
    stop_rule_callback,
    tiny_trainer,
)

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


def train(model, callback, steps, lr, name, stage=3):
    """The Trainer under DeepSpeed ZeRO-``stage`` (seed 42, the TrainingArguments default): (what this rank saw,
    the final weights gathered on every rank)."""
    trainer = tiny_trainer(os.path.join(out, name), model, callback, steps, lr, logging_steps=1, deepspeed=zero(stage))
    trainer.train()
    params = list(trainer.model.parameters())
    partitioned = all(p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # every rank: a collective
        final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"global_step": trainer.state.global_step, "measured": callback.measured, "partitioned": partitioned}, final


def lora_phase(stage=3):
    pretrained = lora_tiny_bert()
    callback = stop_rule_callback(
        Counting,
        os.path.join(out, f"tb-zero{stage}"),
        strict=True,
        asynchronous=stage == 3,
    )
    run = functools.partial(train, name=f"lora{stage}", stage=stage)
    result = measured_phase("lora", pretrained, callback, 12, 0.3, run, rank)
    result["asynchronous"] = callback.asynchronous
    return result


owner_gathers = count_owner_gathers("_gather_partitions")
results = {
    "rank": rank,
    "world_size": int(os.environ["WORLD_SIZE"]),
    "lora": lora_phase(),
    "full": full_phase(Counting, out, functools.partial(train, name="full"), rank),
    "zero2": lora_phase(stage=2),
    "owner_gathers": len(owner_gathers),
}
finish(results, os.path.join(out, f"zero3_{rank}.json"))
