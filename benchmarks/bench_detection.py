"""Per-measurement cost of intruder detection: full SVD (paper / PEFT) vs. SpectralMonitor, with exactness check.

For square n x n layers carrying a rank-8 LoRA update whose singular values are comparable to the pretrained
ones, on a flat (sigma_i ~ i^-0.1) and a steep (i^-0.5) pretrained spectrum, this measures side by side:

- naive: what the paper's code and PEFT's ``intruders.py`` do per measurement -- a full fp32
  ``torch.linalg.svd`` of W0 and of W0 + dW, then max |cos| (Alg. 1);
- ours: the real product path -- a PEFT-wrapped ``nn.Linear`` under ``SpectralMonitor``: ``snapshot()`` once,
  then ``measure()``; "cold" is a first measurement (seeded from the pretrained top vectors), "warm" is the
  steady state in training: a later measurement after a small change of B and A, warm-started from the
  previous one;
- counts at epsilon 0.3 / 0.5 / 0.7 of naive and ours against a float64 full-SVD reference.

Example (the tables in docs/performance.md)::

    python benchmarks/bench_detection.py --threads 2
    python benchmarks/bench_detection.py --quick        # n = 1024 only, one repeat
    python benchmarks/bench_detection.py --device cuda --basis-device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def full_svd_counts(
    W0: torch.Tensor, W: torch.Tensor, dtype: torch.dtype, U0: torch.Tensor | None = None
) -> dict[float, int]:
    """Paper Alg. 1 as PEFT does it: full SVDs of both matrices in ``dtype``, then counts at every epsilon
    (``U0``: the pretrained basis when already known, to share it between reference counts)."""
    if U0 is None:
        U0 = torch.linalg.svd(W0.to(dtype), full_matrices=False)[0]
    U = torch.linalg.svd(W.to(dtype), full_matrices=False)[0][:, :TOP_K]
    return count_intruders(max_abs_cosine(U, U0), list(EPSILONS))


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


def set_factors(model: nn.Module, B: torch.Tensor, A: torch.Tensor) -> None:
    layer = model.base_model.model.proj
    layer.lora_B["default"].weight.data.copy_(B)
    layer.lora_A["default"].weight.data.copy_(A)


def timed(fn, repeats: int) -> tuple[float, float, object]:
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


def counts_of(report) -> dict[float, int]:
    return {e: report.intruders_total_by_epsilon[f"{e:g}"] for e in EPSILONS}


def run_case(n: int, decay: float, args: argparse.Namespace, monitor_options: dict) -> dict:
    W0, B, A = synthetic_layer(n, decay, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    B2 = B + args.drift * B.norm() / B.numel() ** 0.5 * torch.randn(B.shape, generator=g)
    A2 = A + args.drift * A.norm() / A.numel() ** 0.5 * torch.randn(A.shape, generator=g)

    dev = torch.device(args.device)
    W0d, Bd, Ad = W0.to(dev), B.to(dev), A.to(dev)
    full_svd_counts(W0d[:64, :64], W0d[:64, :64], torch.float32)  # warm up the device's SVD kernels
    naive_s, naive_cpu, naive = timed(lambda: full_svd_counts(W0d, W0d + Bd @ Ad, torch.float32), args.naive_repeats)
    U0 = torch.linalg.svd(W0.double(), full_matrices=False)[0]
    reference = full_svd_counts(W0, W0 + B @ A, torch.float64, U0)
    reference2 = full_svd_counts(W0, W0 + B2 @ A2, torch.float64, U0)
    del U0

    model = lora_model(W0, B, A).to(dev)
    monitor = SpectralMonitor(model, top_k=TOP_K, epsilon=list(EPSILONS), progress=False, **monitor_options)
    t0 = time.perf_counter()
    monitor.snapshot()
    snapshot_s = time.perf_counter() - t0

    def cold():
        monitor._warm_start.clear()  # a first measurement: seeded from the pretrained basis only
        return monitor.measure(0)

    cold_s, cold_cpu, cold_report = timed(cold, args.repeats)
    after_first = dict(monitor._warm_start)
    set_factors(model, B2, A2)

    def warm():
        monitor._warm_start.update(after_first)  # each repeat: previous measurement -> small change -> measure
        return monitor.measure(1)

    warm_s, warm_cpu, warm_report = timed(warm, args.repeats)
    (layer_cold,) = cold_report.layers.values()
    (layer_warm,) = warm_report.layers.values()
    return {
        "n": n,
        "spectrum": f"i^-{decay:g}",
        "naive_s": naive_s,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "snapshot_s": snapshot_s,
        "naive_cpu": naive_cpu,
        "cold_cpu": cold_cpu,
        "warm_cpu": warm_cpu,
        "naive_ok": naive == reference,
        "cold_ok": counts_of(cold_report) == reference and layer_cold.converged,
        "warm_ok": counts_of(warm_report) == reference2 and layer_warm.converged,
        "counts": "/".join(str(reference[e]) for e in EPSILONS),
        "iters": f"{layer_cold.iterations}/{layer_warm.iterations}",
        "basis_bytes": monitor.basis_bytes(),
        "warm_bytes": sum(u.numel() * u.element_size() for u in monitor._warm_start.values()),
        "fp16_bytes": n * n * 2,
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| n | spectrum | full SVD (a) s | ours cold s | ours warm s | (a)/cold | (a)/warm | counts 0.3/0.5/0.7 "
        "| (a) = ref | cold = ref | warm = ref | iters cold/warm | snapshot s | held MiB (basis + warm) | W fp16 MiB "
        "| CPU s (a) / cold / warm | (a)/warm by CPU s |\n"
        "|---:|---|---:|---:|---:|---:|---:|---|---|---|---|---|---:|---:|---:|---|---:|"
    )
    mib = 2**20
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['spectrum']} | {r['naive_s']:.2f} | {r['cold_s']:.3f} | {r['warm_s']:.3f} "
            f"| {r['naive_s'] / r['cold_s']:.0f}x | {r['naive_s'] / r['warm_s']:.0f}x | {r['counts']} "
            f"| {'yes' if r['naive_ok'] else 'NO'} | {'yes' if r['cold_ok'] else 'NO'} | {'yes' if r['warm_ok'] else 'NO'} "
            f"| {r['iters']} | {r['snapshot_s']:.2f} | {r['basis_bytes'] / mib:.1f} + {r['warm_bytes'] / mib:.2f} "
            f"| {r['fp16_bytes'] / mib:.1f} | {r['naive_cpu']:.2f} / {r['cold_cpu']:.3f} / {r['warm_cpu']:.3f} "
            f"| {r['naive_cpu'] / r['warm_cpu']:.0f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.1, 0.5], help="pretrained sigma_i ~ i^-decay")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of our measurement (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed repeats of the full-SVD path")
    parser.add_argument("--drift", type=float, default=0.01, help="relative change of B, A before the warm measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--basis-dtype", default="float16")
    parser.add_argument("--quick", action="store_true", help="n = 1024 only, one repeat (a smoke run)")
    parser.add_argument("--device", default="cpu", help="where the weights live and both methods compute (e.g. cuda)")
    parser.add_argument("--basis-device", default="cpu", help="where the monitor keeps the pretrained bases")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [1024], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(
        f"torch {torch.__version__}, {where}, basis_dtype={args.basis_dtype}, basis on {args.basis_device}", flush=True
    )
    rows = []
    for n in args.sizes:
        for decay in args.decays:
            rows.append(run_case(n, decay, args, {"basis_dtype": args.basis_dtype, "basis_device": args.basis_device}))
            r = rows[-1]
            print(
                f"n={n} {r['spectrum']}: naive {r['naive_s']:.2f}s cold {r['cold_s']:.3f}s warm {r['warm_s']:.3f}s "
                f"ok={r['naive_ok']},{r['cold_ok']},{r['warm_ok']} iters {r['iters']}",
                flush=True,
            )
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
