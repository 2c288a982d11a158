"""How often a threshold decision needs the float64 pass on a real LLM fine-tune, what it costs, and whether the
counts then equal a float64 full-SVD recount.

The run of issue 19: TRL SFT of SmolLM2-135M-Instruct (examples/sft_smollm2.py: LoRA r=16 on q, k, v, o, gate, up,
down of all 30 layers = 210 matrices, lr 1e-2, 40 steps, measured every 20 steps, epsilon 0.5/0.3/0.7). For each
measurement it prints the decisions the fp32 solver with an fp16 basis left open and the float64 pass settled
(``resolved``), those left ``uncertain``, and the wall time of the layers that needed the pass against the median
layer; at the end, every count against a float64 full SVD of the merged weights (PEFT's own delta).

    python benchmarks/threshold_decisions.py --threads 2          # about 5 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from sft_smollm2 import chat_dataset, invented_capitals, load_model, lora_config, sft_trainer
from smollm2_model import smollm2_path
from transformers import TrainerCallback

from lora_spectral_callback import LoRASpectralCallback
from lora_spectral_callback.layers import readable_name
from lora_spectral_callback.metrics import count_intruders, max_abs_cosine

EPS = [0.5, 0.3, 0.7]


class Collect(TrainerCallback):
    """After the spectral callback at each event, keeps each new report it made."""

    def __init__(self, spectral: LoRASpectralCallback) -> None:
        self.spectral, self.reports = spectral, []

    def _keep(self, *args, **kwargs) -> None:
        report = self.spectral.last_report
        if report is not None and (not self.reports or report is not self.reports[-1]):
            self.reports.append(report)

    on_train_begin = on_step_end = on_train_end = _keep


def float64_counts(model) -> dict[str, dict[float, int]]:
    """Paper Alg. 1 with full float64 SVDs of every LoRA layer: base weight plus PEFT's ``get_delta_weight``."""
    from peft.tuners.lora import LoraLayer

    counts = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            W0 = module.get_base_layer().weight.detach().double()
            merged = W0 + module.get_delta_weight("default").detach().double()
            U0 = torch.linalg.svd(W0, full_matrices=False)[0]
            U = torch.linalg.svd(merged, full_matrices=False)[0][:, :10]
            counts[readable_name(path)] = count_intruders(max_abs_cosine(U, U0), EPS)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    path = str(smollm2_path())
    torch.manual_seed(0)
    model = load_model(path)
    callback = LoRASpectralCallback(every_n_steps=args.every, epsilon=EPS, progress=False)
    collect = Collect(callback)
    with tempfile.TemporaryDirectory() as out:
        trainer = sft_trainer(
            model,
            AutoTokenizer.from_pretrained(path),
            chat_dataset(invented_capitals(), n=4 * args.steps),
            out,
            [callback, collect],
            peft_config=lora_config(16),
            max_steps=args.steps,
            learning_rate=args.lr,
            report_to=[],
        )
        trainer.train()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | matrices | resolved | uncertain | layers resolved: s each | median layer s | measurement s |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for report in collect.reports:
        slow = [f"{layer.seconds:.3f}" for layer in report.layers.values() if layer.resolved]
        median = statistics.median(layer.seconds for layer in report.layers.values())
        print(
            f"| {report.step} | {len(report.layers)} | {report.resolved} | {report.uncertain} | "
            f"{', '.join(slow) or '-'} | {median:.3f} | {report.seconds:.1f} |"
        )
    last = collect.reports[-1]
    reference = float64_counts(trainer.model)
    for eps in EPS:
        ours = sum(layer.intruders_by_epsilon[f"{eps:g}"] for layer in last.layers.values())
        exact = sum(counts[eps] for counts in reference.values())
        wrong = [n for n, layer in last.layers.items() if layer.intruders_by_epsilon[f"{eps:g}"] != reference[n][eps]]
        print(f"epsilon {eps}: monitor {ours}, float64 recount {exact}, layers that differ: {wrong or 'none'}")


if __name__ == "__main__":
    main()
