"""Run under torchrun by test_distributed.py: a tiny DDP Trainer (gloo, CPU) with the callback and a stop rule;
then full fine-tuning mode (each rank keeps and measures its share of the pretrained copies), and a run resumed
from its checkpoint (the baseline saved from both ranks' copies, restored into each rank's share).

Each rank writes ``rank<N>.json`` to argv[1] with what it saw (and rank 0 a float64 recount of the final weights),
so the test can compare ranks.
"""

import copy
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import (
    EPS,
    Counting,
    finish,
    full_phase,
    lora_tiny_bert,
    measured_phase,
    stop_rule_callback,
    tiny_trainer,
)
from helpers import recount_run, tiny_bert

out = sys.argv[1]
rank = int(os.environ["RANK"])
pretrained = lora_tiny_bert()
model = copy.deepcopy(pretrained)


callback = stop_rule_callback(  # with pictures of every layer, whichever rank measured it
    Counting, os.path.join(out, "tb"), image_every_n_measurements=1, image_layers=-1
)
trainer = tiny_trainer(os.path.join(out, "out"), model, callback, 12, 0.3, ddp_backend="gloo", logging_steps=1)
trainer.train()
result = {
    "rank": rank,
    "world_size": int(os.environ["WORLD_SIZE"]),
    "global_step": trainer.state.global_step,
    "measured": callback.measured,
    "svds": callback.monitor.snapshots.store.computed,
    "alert_step": callback.last_alert.step if callback.last_alert else None,
    "intruders": callback.last_report.intruders_total if callback.last_report else None,
}
if rank == 0:
    result.update(recount_run("lora", pretrained, model.state_dict(), callback, EPS))


def train_full(model, callback, steps, lr, resume=None):
    """Full fine-tuning mode under DDP, a checkpoint every 2 steps: (what this rank saw, the final weights)."""
    checkpoints = dict(save_strategy="steps", save_steps=2)
    trainer = tiny_trainer(os.path.join(out, "full"), model, callback, steps, lr, ddp_backend="gloo", **checkpoints)
    trainer.train(resume_from_checkpoint=resume)
    return {"global_step": trainer.state.global_step, "measured": callback.measured}, model.state_dict()


result["full"] = full_phase(Counting, out, train_full, rank)
# the same run resumed from its step-2 checkpoint: the pretrained copies come back from the baseline file
resumed = Counting(every_n_steps=2, epsilon=EPS, include=r"query|value", mode="full", progress=False, strict=True)
resume = functools.partial(train_full, resume=os.path.join(out, "full", "checkpoint-2"))
result["resumed"] = measured_phase("full", tiny_bert(hidden=64), resumed, 4, 1e-2, resume, rank)
finish(result, os.path.join(out, f"rank{rank}.json"))
