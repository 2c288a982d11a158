"""Per-measurement cost of intruder detection: one full SVD vs SpectralMonitor, with an exactness check.

The protocol of issue 12. An n x n layer (default 4096) with a rank-8 LoRA update whose singular values are
comparable to the pretrained ones, on a flat (sigma_i ~ i^-0.1) and a steep (i^-0.5) pretrained spectrum:

- baseline: what a careful user of the paper's code does per measurement, the pretrained basis already cached
  (fp32): ONE fp32 ``torch.linalg.svd(merged, full_matrices=False)`` of the merged matrix, then max |cos| of its
  top-10 left vectors against the cached basis (paper Alg. 1);
- ours, warm: the steady state in training. A PEFT-wrapped ``nn.Linear`` under ``SpectralMonitor``: a measurement
  at (B, A), then B perturbed by ``--drift`` (5%) of its norm, about 50 steps early in training, and the timed
  ``measure()``, which starts from the previous measurement's state;
- ours, cold: a first measurement on an already-trained adapter (the CLI, a resumed run): no previous state;
- counts at epsilon 0.3 / 0.5 / 0.7 of the baseline and of ours against a float64 full-SVD reference (both
  pretrained and merged matrices in float64). Ours must match exactly: the script fails otherwise.

Ratios are taken within one run, so they hold on a loaded machine better than the absolute times; process CPU
time (all threads) is printed as well. Example (the table in the docs, "Performance")::

    python benchmarks/bench_detection.py --threads 2
    python benchmarks/bench_detection.py --quick                  # n = 1024, a smoke run
    python benchmarks/bench_detection.py --device cuda --basis-device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.metrics import count_intruders, max_abs_cosine

EPSILONS = (0.3, 0.5, 0.7)
RANK = 8
TOP_K = 10


def synthetic_layer(n: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 with sigma_i = i^-decay (random singular vectors) and a rank-8 update B A with singular values
    1.5 ... 0.4 x sigma_1: half its directions random, half tilted towards pretrained top directions, so the
    merged top-10 mixes old, new and in-between vectors (cosines spread across the thresholds)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    sigma = torch.arange(1, n + 1, dtype=torch.float32) ** -decay
    W0 = (U * sigma) @ V.T
    tilt = torch.linspace(0.9, 0.0, RANK)  # cosine of each update direction with a pretrained top direction
    mixed = U[:, :RANK] * tilt + torch.randn(n, RANK, generator=g) / n**0.5 * (1 - tilt**2).sqrt()
    Qb = torch.linalg.qr(mixed).Q
    Qa = torch.linalg.qr(torch.randn(n, RANK, generator=g)).Q
    s = torch.linspace(1.5, 0.4, RANK)
    return W0, Qb * s, Qa.T


def drifted(B: torch.Tensor, drift: float, seed: int) -> torch.Tensor:
    """``B`` plus a random change of ``drift`` times its Frobenius norm."""
    G = torch.randn(B.shape, generator=torch.Generator().manual_seed(seed), dtype=B.dtype)
    return B + drift * B.norm() * G / G.norm()


def counts(U: torch.Tensor, U0: torch.Tensor) -> dict[float, int]:
    return count_intruders(max_abs_cosine(U[:, :TOP_K], U0), list(EPSILONS))  # type: ignore[return-value]


def baseline(merged: torch.Tensor, U0: torch.Tensor) -> dict[float, int]:
    """One fp32 full SVD of the merged matrix and the cosine pass against the cached pretrained basis."""
    return counts(torch.linalg.svd(merged, full_matrices=False)[0], U0)


class OneLayer(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def lora_model(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> nn.Module:
    """A PEFT LoRA model (r=8, alpha=8 so scaling 1) whose merged weight is exactly W0 + B A."""
    from peft import LoraConfig, get_peft_model

    base = OneLayer(W0.shape[0])
    base.proj.weight.data.copy_(W0)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["proj"]))
    set_factors(model, B, A)
    return model


def set_factors(model: Any, B: torch.Tensor, A: torch.Tensor) -> None:
    layer = model.base_model.model.proj
    layer.lora_B["default"].weight.data.copy_(B)
    layer.lora_A["default"].weight.data.copy_(A)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median wall time and median process CPU time (all threads) of ``repeats`` calls, and the last result.

    On a shared machine wall time includes waiting for cores; CPU time is closer to the work done."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        _synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report_counts(report) -> dict[float, int]:
    return {e: report.intruders_total_by_epsilon[f"{e:g}"] for e in EPSILONS}


def run_case(n: int, decay: float, args: argparse.Namespace) -> dict:
    W0, B, A = synthetic_layer(n, decay, args.seed)
    B2 = drifted(B, args.drift, args.seed + 1)
    dev = torch.device(args.device)

    # float64 references: the pretrained basis and both merged matrices
    U0_64 = torch.linalg.svd(W0.double(), full_matrices=False)[0]
    reference = counts(torch.linalg.svd((W0 + B @ A).double(), full_matrices=False)[0], U0_64)
    reference2 = counts(torch.linalg.svd((W0 + B2 @ A).double(), full_matrices=False)[0], U0_64)
    del U0_64

    U0 = torch.linalg.svd(W0.to(dev), full_matrices=False)[0]  # the cached fp32 basis of the baseline
    merged = (W0 + B2 @ A).to(dev)
    baseline(merged[:64, :64], U0[:64, :64])  # warm up the device's kernels
    base_s, base_cpu, base_counts = timed(lambda: baseline(merged, U0), args.baseline_repeats)

    model = lora_model(W0, B, A).to(dev)
    options = {"basis_dtype": args.basis_dtype, "basis_device": args.basis_device}
    monitor = SpectralMonitor(model, top_k=TOP_K, epsilon=list(EPSILONS), progress=False, **options)
    t0 = time.perf_counter()
    monitor.snapshot()
    snapshot_s = time.perf_counter() - t0

    def cold():
        # a first measurement: nothing to start from but the pretrained basis
        for state in monitor.snapshots.layers.values():
            state.warm_start = None
        return monitor.measure(0)

    cold_s, cold_cpu, cold_report = timed(cold, args.repeats)
    layers = monitor.snapshots.layers
    previous = {name: state.warm_start for name, state in layers.items()}  # what measuring (B, A) leaves
    set_factors(model, B2.to(dev), A.to(dev))

    def warm():
        for name, state in layers.items():  # each repeat: measured at (B, A), then B drifted, then measured
            state.warm_start = previous[name]
        return monitor.measure(1)

    warm_s, warm_cpu, warm_report = timed(warm, args.repeats)
    (layer_cold,) = cold_report.layers.values()
    (layer_warm,) = warm_report.layers.values()
    return {
        "n": n,
        "spectrum": f"i^-{decay:g}",
        "base_s": base_s,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "snapshot_s": snapshot_s,
        "base_cpu": base_cpu,
        "cold_cpu": cold_cpu,
        "warm_cpu": warm_cpu,
        "base_ok": base_counts == reference2,
        "cold_ok": report_counts(cold_report) == reference and layer_cold.converged,
        "warm_ok": report_counts(warm_report) == reference2 and layer_warm.converged,
        "counts": "/".join(str(reference2[e]) for e in EPSILONS),
        "iters": f"{layer_cold.iterations}/{layer_warm.iterations}",
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| n | spectrum | 1 fp32 SVD + cos (a) s | ours warm s | ours cold s | (a)/warm | (a)/cold "
        "| counts 0.3/0.5/0.7 | (a) = ref | warm = ref | cold = ref | steps cold/warm | snapshot s "
        "| CPU s (a) / warm / cold | (a)/warm, (a)/cold by CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|---|---|---|---:|---|---|",
    ]
    yes = {True: "yes", False: "NO"}
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['spectrum']} | {r['base_s']:.2f} | {r['warm_s']:.3f} | {r['cold_s']:.3f} "
            f"| {r['base_s'] / r['warm_s']:.0f}x | {r['base_s'] / r['cold_s']:.0f}x | {r['counts']} "
            f"| {yes[r['base_ok']]} | {yes[r['warm_ok']]} | {yes[r['cold_ok']]} | {r['iters']} "
            f"| {r['snapshot_s']:.2f} | {r['base_cpu']:.2f} / {r['warm_cpu']:.3f} / {r['cold_cpu']:.3f} "
            f"| {r['base_cpu'] / r['warm_cpu']:.0f}x, {r['base_cpu'] / r['cold_cpu']:.0f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.1, 0.5], help="pretrained sigma_i ~ i^-decay")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of our measurements (median)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed repeats of the full SVD")
    parser.add_argument("--drift", type=float, default=0.05, help="change of B, relative to its norm, before warm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--basis-dtype", default="float16")
    parser.add_argument("--quick", action="store_true", help="n = 1024, a smoke run")
    parser.add_argument("--device", default="cpu", help="where the weights live and both methods compute (e.g. cuda)")
    parser.add_argument("--basis-device", default="cpu", help="where the monitor keeps the pretrained bases")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [1024]
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print("$ python " + " ".join(sys.argv))
    print(
        f"torch {torch.__version__}, {where}, basis_dtype={args.basis_dtype}, basis on {args.basis_device}, "
        f"drift {args.drift:g}",
        flush=True,
    )
    rows = []
    for n in args.sizes:
        for decay in args.decays:
            rows.append(run_case(n, decay, args))
            r = rows[-1]
            print(
                f"n={n} {r['spectrum']}: baseline {r['base_s']:.2f}s warm {r['warm_s']:.3f}s cold {r['cold_s']:.3f}s "
                f"ok={r['base_ok']},{r['warm_ok']},{r['cold_ok']} steps {r['iters']}",
                flush=True,
            )
    print()
    print(markdown(rows))
    wrong = [f"n={r['n']} {r['spectrum']}" for r in rows if not (r["warm_ok"] and r["cold_ok"])]
    if wrong:
        sys.exit(f"counts differ from the float64 reference (or did not converge): {', '.join(wrong)}")


if __name__ == "__main__":
    main()
