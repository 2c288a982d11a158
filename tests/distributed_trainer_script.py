"""Run under torchrun by test_distributed.py: a tiny DDP Trainer (gloo, CPU) with the callback and a stop rule.

Each rank writes ``rank<N>.json`` to argv[1] with what it saw (and rank 0 a float64 recount of the final weights),
so the test can compare ranks.
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import EPS, lora_tiny_bert, record_measurements, stop_rule_callback
from helpers import RandomTokens, recount_run
from training import make_trainer

from lora_spectral_callback import LoRASpectralCallback

out = sys.argv[1]
rank = int(os.environ["RANK"])
pretrained = lora_tiny_bert()
model = copy.deepcopy(pretrained)
measured = []


class Counting(LoRASpectralCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if self.monitor is None:
            from lora_spectral_callback import SpectralMonitor

            self.monitor = SpectralMonitor(kwargs["model"], self.config)
            record_measurements(self.monitor, measured)
        return super().on_train_begin(args, state, control, **kwargs)


callback = stop_rule_callback(  # with pictures of every layer, whichever rank measured it
    Counting, os.path.join(out, "tb"), image_every_n_measurements=1, image_layers=-1
)
trainer = make_trainer(
    os.path.join(out, "out"),
    model,
    [callback],
    12,
    data=RandomTokens(n=128),
    per_device_train_batch_size=4,
    learning_rate=0.3,
    ddp_backend="gloo",
    logging_steps=1,
    seed=42,
)
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
