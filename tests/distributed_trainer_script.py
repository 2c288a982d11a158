"""Run under torchrun by test_distributed.py: a tiny DDP Trainer (gloo, CPU) with the callback and a stop rule.

Each rank writes ``rank<N>.json`` to argv[1] with what it saw, so the test can compare ranks.
"""

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from helpers import RandomTokens, tiny_bert

from lora_spectral_callback import LoRASpectralCallback

out = sys.argv[1]
rank = int(os.environ["RANK"])
model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
measured = []


def count_measurements(monitor):
    """Record every measurement this rank makes (should be none except on rank 0)."""
    inner = monitor.measure

    def measure(step=None):
        measured.append(step)
        return inner(step)

    monitor.measure = measure


class Counting(LoRASpectralCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if self.monitor is None:
            from lora_spectral_callback import SpectralMonitor

            self.monitor = SpectralMonitor(kwargs["model"], **self.options)
            count_measurements(self.monitor)
        return super().on_train_begin(args, state, control, **kwargs)


callback = Counting(every_n_steps=2, max_intruders=0, log_dir=os.path.join(out, "tb"), progress=False)
args = TrainingArguments(
    output_dir=os.path.join(out, "out"),
    max_steps=12,
    per_device_train_batch_size=4,
    learning_rate=0.3,
    report_to=[],
    use_cpu=True,
    ddp_backend="gloo",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=128), callbacks=[callback])
trainer.train()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(
        {
            "rank": rank,
            "world_size": int(os.environ["WORLD_SIZE"]),
            "global_step": trainer.state.global_step,
            "measured": measured,
            "alert_step": callback.last_alert.step if callback.last_alert else None,
            "intruders": callback.last_report.intruders_total if callback.last_report else None,
        },
        f,
    )
torch.distributed.destroy_process_group()  # without it a rank sometimes aborted at exit ("terminate called ...")
