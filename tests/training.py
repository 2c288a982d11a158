"""Shared by the Trainer-level tests: a tiny LoRA BERT, a short CPU Trainer run, and a TensorBoard reader."""

from __future__ import annotations

from helpers import RandomTokens, tiny_bert
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments


def lora_bert(seed: int = 0, random_update: bool = True):
    """Tiny BERT with LoRA on query/value. ``random_update`` starts B random (not 0) with a large scale, so the
    update dominates the merged weights and every measurement has intruders (for alert tests)."""
    config = LoraConfig(
        r=4,
        lora_alpha=64 if random_update else 8,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
        init_lora_weights=not random_update,
    )
    return get_peft_model(tiny_bert(hidden=32, layers=2, seed=seed), config)


def make_trainer(
    output_dir,
    model,
    callbacks: list[TrainerCallback],
    max_steps: int = 6,
    *,
    data=None,
    args_class: type[TrainingArguments] = TrainingArguments,
    trainer_class: type[Trainer] = Trainer,
    trainer_options: dict | None = None,
    **args,
) -> Trainer:
    """A short CPU Trainer run, not started. ``args`` add to or override the TrainingArguments below; ``data`` is
    the train dataset (default 32 ``RandomTokens``); ``args_class``/``trainer_class`` (with ``trainer_options``
    for the extra constructor arguments) take another trainer, e.g. TRL's SFTConfig/SFTTrainer."""
    options = dict(
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
    )
    options.update(args)
    return trainer_class(
        model=model,
        args=args_class(str(output_dir), **options),
        train_dataset=RandomTokens(32) if data is None else data,
        callbacks=callbacks,
        **(trainer_options or {}),
    )


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag as TensorBoard shows it (EventAccumulator, which applies purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class At(TrainerCallback):
    """Runs ``fn(model, step)`` at the end of every optimizer step; put it before the spectral callback so a
    fault is in place when that step is measured."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.fn(model, state.global_step)
