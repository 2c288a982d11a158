"""Run under torchrun by test_distributed.py: FSDP2 (``fully_shard``) on 2 CPU processes (gloo), a custom loop
that drives the callback's events the way the Trainer does, in LoRA mode (with a stop rule that fires) and in
full fine-tuning mode; then FSDP1, which must be refused. The Trainer itself cannot run FSDP on CPU (accelerate
falls back to DDP there).

Each rank writes ``fsdp<N>.json`` to argv[1]: what it measured, where it stopped, and, on rank 0, the float64
recount of the gathered final weights.
"""

import os
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import (
    count_owner_gathers,
    finish,
    full_phase,
    lora_tiny_bert,
    measured_phase,
    record_measurements,
    stop_rule_callback,
)
from helpers import RandomTokens, tiny_bert

from lora_spectral_callback import LoRASpectralCallback

out = sys.argv[1]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a rank left behind fails fast
rank = dist.get_rank()


def shard(model):
    for layer in model.get_submodule(
        "bert.encoder.layer" if hasattr(model, "bert") else "base_model.model.bert.encoder.layer"
    ):
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model, callback, steps, lr):
    """Shards ``model`` and trains it in the Trainer's event order: train begin (baseline measurement), step ends,
    train end. Returns (what this rank saw, the final weights gathered on every rank)."""
    model = shard(model)
    args, state, control = SimpleNamespace(output_dir=os.path.join(out, "out")), TrainerState(), TrainerControl()
    state.is_world_process_zero, state.max_steps = rank == 0, steps
    measured = []
    callback.on_train_begin(args, state, control, model=model)
    record_measurements(callback.monitor, measured)
    data = RandomTokens(n=64, seed=rank)  # each rank its own batches, as under a distributed sampler
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        batch = data[slice((step - 1) * 4, step * 4)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        callback.on_step_end(args, state, control)
        if control.should_training_stop:
            break
    callback.on_train_end(args, state, control)
    return {"global_step": state.global_step, "measured": measured}, gathered_state(model)


def gathered_state(model):
    """Every parameter whole, on every rank (each full_tensor is a collective, taken in the same order)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def lora_phase():
    pretrained = lora_tiny_bert()
    callback = stop_rule_callback(
        LoRASpectralCallback,
        os.path.join(out, "tb"),
        strict=True,
        asynchronous=True,
        forgetting_proxy=lambda model: {"drift": 0.0},
        image_every_n_measurements=1,
    )
    result = measured_phase("lora", pretrained, callback, 12, 0.3, train, rank)
    result.update(asynchronous=callback.asynchronous, forgetting_proxy=callback.forgetting_proxy is not None)
    return result


def faults_phase():
    """A layer failing after its gathers, a failing copy, and a strict raise mid-walk, on whichever rank owns the
    layer: the ranks must stay in step (the all-reduce after each would time out otherwise: the process group has
    a 60 s timeout)."""
    from lora_spectral_callback import SpectralMonitor
    from lora_spectral_callback.distributed import any_rank

    model = shard(lora_tiny_bert())
    outcomes = {}
    for strict in (False, True):
        monitor = SpectralMonitor(model, progress=False, strict=strict)
        first, second = monitor.matrices[0], monitor.matrices[1]
        real_measure, real_capture = monitor.measurer.layer, second.capture

        def measure_matrix(matrix, real_measure=real_measure, first=first):
            if matrix.name == first.name:
                raise RuntimeError("simulated failure while measuring")
            return real_measure(matrix)

        def capture(real_capture=real_capture):
            real_capture()  # the gathers happen, then the copy fails
            raise torch.OutOfMemoryError("simulated failure after gathering")

        monitor.measurer.layer, second.capture = measure_matrix, capture
        try:
            report = monitor.measure(1)
            outcomes[strict] = (
                None if report is None else {"errors": sorted(report.errors), "layers": list(report.layers)}
            )
        except RuntimeError as err:
            outcomes[strict] = f"raised: {err}"
        any_rank(False)  # both ranks reach this only if every gather was matched
    return {"lenient": outcomes[False], "strict": outcomes[True]}


def fsdp1_refused():
    """FSDP1 (flat parameters) is refused with a clear error, whether the wrapper or the model inside is handed over."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lora_spectral_callback import SpectralMonitor

    wrapped = FullyShardedDataParallel(tiny_bert(), device_id=torch.device("cpu"), use_orig_params=True)
    messages = []
    for model in (wrapped, wrapped.module):
        try:
            SpectralMonitor(model, include="query", progress=False)
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    return messages


owner_gathers = count_owner_gathers("_gather_rows")
results = {
    "rank": rank,
    "world_size": dist.get_world_size(),
    "lora": lora_phase(),
    "full": full_phase(LoRASpectralCallback, out, train, rank),
    "faults": faults_phase(),
    "fsdp1": fsdp1_refused(),
    "owner_gathers": len(owner_gathers),
}
finish(results, os.path.join(out, f"fsdp{rank}.json"))
