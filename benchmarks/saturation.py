"""Intruder counts saturate on wide matrices; the intruder energy share and sigma ratio stay graded.

At hidden size d a random unit vector has max |cos| of about sqrt(2 ln d / d) against a full orthonormal basis
(0.06 at d = 4096), so at epsilon = 0.5 *every* direction a LoRA update pushes into the top-k is an intruder,
however weak: the count only says how many top-k slots the update reached. This script builds one d x d
"pretrained" weight with a power-law spectrum (sigma_i = i^-1/2, sigma_1 = 1, like trained weights' smooth decay),
adds a rank-r LoRA update with random directions and singular values ``t * linspace(1, 0.1, r)``, and measures it
with :class:`SpectralMonitor` (the real PEFT layer and solver) for growing strengths t.

    PYTHONPATH=$PWD python benchmarks/saturation.py --dim 4096     # ~1 min on one CPU thread (the SVD snapshot)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from lora_spectral_callback import SpectralMonitor

SCALES = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator)).Q


def saturation_rows(dim: int, rank: int = 16, scales=SCALES, seed: int = 0) -> list[dict[str, float]]:
    """One row per strength t: intruder count, energy share, sigma ratio and first position (top-10, eps=0.5)."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    sigma = torch.arange(1, dim + 1, dtype=torch.float32) ** -0.5
    U, V = random_orthonormal(dim, dim, g), random_orthonormal(dim, dim, g)
    layer = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        layer.weight.copy_((U * sigma) @ V.T)
    model = get_peft_model(nn.Sequential(layer), LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    lora: Any = model.get_submodule("base_model.model.0")
    B, A = random_orthonormal(dim, rank, g), random_orthonormal(dim, rank, g).T  # scaling alpha/r = 1
    strengths = torch.linspace(1.0, 0.1, rank)
    monitor = SpectralMonitor(model, progress=False)
    rows = []
    for t in scales:
        with torch.no_grad():
            lora.lora_B["default"].weight.copy_(B * (t * strengths))
            lora.lora_A["default"].weight.copy_(A)
        report = monitor.measure()
        assert report is not None  # None only on a non-main rank of a sharded model
        rows.append(
            {
                "t": t,
                "intruders": report.intruders_total,
                "energy_share": report.intruder_energy_share,
                "sigma_ratio": report.intruder_sigma_ratio,
                "first": report.first_intruder,
                "min_max_cos": min(report.layers["0"].max_cos),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = saturation_rows(opts.dim, opts.rank, seed=opts.seed)
    print(f"d = {opts.dim}, LoRA rank {opts.rank}, top-10, epsilon = 0.5\n")
    print("| update strength t | intruders (of 10) | energy share | sigma ratio | first intruder | min max\\|cos\\| |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['t']:g} | {r['intruders']} | {r['energy_share']:.3f} | {r['sigma_ratio']:.3f} | {r['first']} | "
            f"{r['min_max_cos']:.3f} |"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
