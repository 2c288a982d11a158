"""Run under torchrun by test_distributed.py: a tiny DDP Trainer (gloo, CPU) with the callback and a stop rule.

Each rank writes ``rank<N>.json`` to argv[1] with what it saw (and rank 0 a float64 recount of the final weights),
so the test can compare ranks.
"""

import copy
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from helpers import RandomTokens, recount_run, tiny_bert

from lora_spectral_callback import LoRASpectralCallback

out = sys.argv[1]
rank = int(os.environ["RANK"])
EPS = [0.5, 0.7]
pretrained = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
model = copy.deepcopy(pretrained)
measured = []


def count_measurements(monitor):
    """Record every measurement call on this rank and whether it returned the report (rank 0 only should)."""
    inner = monitor.measure

    def measure(step=None):
        report = inner(step)
        measured.append((step, report is not None))
        return report

    monitor.measure = measure


class Counting(LoRASpectralCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if self.monitor is None:
            from lora_spectral_callback import SpectralMonitor

            self.monitor = SpectralMonitor(kwargs["model"], self.config)
            count_measurements(self.monitor)
        return super().on_train_begin(args, state, control, **kwargs)


callback = Counting(every_n_steps=2, max_intruders=0, epsilon=EPS, log_dir=os.path.join(out, "tb"), progress=False)
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
result = {
    "rank": rank,
    "world_size": int(os.environ["WORLD_SIZE"]),
    "global_step": trainer.state.global_step,
    "measured": measured,
    "svds": callback.monitor.snapshots.store.computed,
    "alert_step": callback.last_alert.step if callback.last_alert else None,
    "intruders": callback.last_report.intruders_total if callback.last_report else None,
}
if rank == 0:
    result.update(recount_run("lora", pretrained, model.state_dict(), callback, EPS))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
torch.distributed.destroy_process_group()  # without it a rank sometimes aborted at exit ("terminate called ...")
