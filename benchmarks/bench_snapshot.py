"""Ways to compute the pretrained snapshot (the thin left basis): seconds, and accuracy against float64 LAPACK.

For each weight shape (default: Llama-3-8B's q/o, k/v, down and gate/up) and pretrained spectrum sigma_i ~ i^-decay
(flat 0.1, steep 0.5; random singular vectors), it times

- ``svd fp32``: ``torch.linalg.svd`` in float32, as the paper's code computes it;
- ``gram fp64``: the float64 eigendecomposition of the smaller Gram matrix (``method="gram"``, the default);
- ``gram fp32``: the same in float32 (measured, not offered: see its accuracy);
- ``svd fp64``: the float64 reference itself;
- on CUDA also ``torch.linalg.svd``'s drivers ``gesvd``, ``gesvdj``, ``gesvda`` (float32).

Accuracy: the top-10 left singular vectors of a merged matrix ``W0 + B A`` (a rank-8 update whose singular values
are 1.5 ... 0.4 x sigma_1, half its directions tilted towards pretrained ones, as in ``bench_detection.py``) are
taken from a float64 SVD, and their max |cos| against each basis (as computed, and rounded to fp16 as the monitor
stores it) is compared with that against the float64 basis: the largest difference, and whether the intruder counts
at epsilon 0.3 / 0.5 / 0.7 agree. Also the basis' loss of orthonormality ``max |U^T U - I|``.

    python benchmarks/bench_snapshot.py --threads 2
    python benchmarks/bench_snapshot.py --quick                       # 1024-sized shapes, a smoke run
    python benchmarks/bench_snapshot.py --device cuda --shapes 4096x4096 4096x14336
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lora_spectral_callback.metrics import count_intruders, max_abs_cosine, pretrained_basis_and_spectrum

EPSILONS = [0.3, 0.5, 0.7]
RANK, TOP_K = 8, 10


def weight_and_update(m: int, n: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``W0`` with sigma_i = i^-decay, and the merged matrix ``W0 + B A`` of a rank-8 update."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    W0 = (U * torch.arange(1, r + 1, dtype=torch.float64) ** -decay) @ V.T
    tilt = torch.linspace(0.9, 0.0, RANK, dtype=torch.float64)
    noise = torch.randn(m, RANK, generator=g, dtype=torch.float64) / m**0.5
    Qb = torch.linalg.qr(U[:, :RANK] * tilt + noise * (1 - tilt**2).sqrt()).Q
    Qa = torch.linalg.qr(torch.randn(n, RANK, generator=g, dtype=torch.float64)).Q
    return W0, W0 + (Qb * torch.linspace(1.5, 0.4, RANK, dtype=torch.float64)) @ Qa.T


def gram32(W: torch.Tensor) -> torch.Tensor:
    m, n = W.shape
    W = W.float()
    lam, X = torch.linalg.eigh(W @ W.T if m <= n else W.T @ W)
    lam, X = lam.flip(0).clamp_min(0), X.flip(1)
    return X if m <= n else torch.linalg.qr(W @ (X / lam.sqrt().clamp_min(torch.finfo(W.dtype).tiny))).Q


def svd(dtype: torch.dtype, driver: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    def left_basis(W: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(W.to(dtype), full_matrices=False, driver=driver)[0]

    return left_basis


def gram64(W: torch.Tensor) -> torch.Tensor:
    return pretrained_basis_and_spectrum(W, torch.float64, "gram")[0]


def methods(device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    found = {"svd fp32": svd(torch.float32), "gram fp64": gram64, "gram fp32": gram32, "svd fp64": svd(torch.float64)}
    if device.type == "cuda":  # driver= exists for CUDA only
        found |= {f"svd fp32 {d}": svd(torch.float32, d) for d in ("gesvd", "gesvdj", "gesvda")}
    return found


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run_case(m: int, n: int, decay: float, device: torch.device, seed: int) -> list[dict]:
    W0, merged = weight_and_update(m, n, decay, seed)
    top = torch.linalg.svd(merged, full_matrices=False)[0][:, :TOP_K]  # float64 reference vectors
    W0_dev = W0.to(device)
    rows: list[dict[str, Any]] = []
    reference = None
    for name, method in methods(device).items():
        method(W0_dev[:64, :64])  # warm up kernels
        seconds, U0 = timed(functools.partial(method, W0_dev))
        U0 = U0.cpu()
        if name == "svd fp64":
            reference = U0
        rows.append({"name": name, "seconds": seconds, "basis": U0})
    assert reference is not None
    ref_cos = max_abs_cosine(top, reference)
    ref_counts = count_intruders(ref_cos, EPSILONS)
    out = []
    for row in rows:
        U0 = row.pop("basis")
        cos = max_abs_cosine(top, U0.double())
        cos16 = max_abs_cosine(top, U0.half())
        eye = torch.eye(U0.shape[1], dtype=torch.float64)
        out.append(
            row
            | {
                "shape": f"{m}x{n}",
                "spectrum": f"i^-{decay:g}",
                "cos_err": float((cos - ref_cos).abs().max()),
                "cos16_err": float((cos16 - ref_cos).abs().max()),
                "counts_ok": count_intruders(cos, EPSILONS) == ref_counts
                and count_intruders(cos16, EPSILONS) == ref_counts,
                "orth": float((U0.double().T @ U0.double() - eye).abs().max()),
                "counts": "/".join(str(ref_counts[e]) for e in EPSILONS),  # type: ignore[index]
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "1024x4096", "4096x14336", "14336x4096"])
    parser.add_argument("--decays", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="shapes 1024x1024 256x1024 1024x3584 3584x1024")
    args = parser.parse_args()
    if args.quick:
        args.shapes = ["1024x1024", "256x1024", "1024x3584", "3584x1024"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print("$ python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, {where}", flush=True)
    rows = []
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        for decay in args.decays:
            rows += run_case(m, n, decay, device, args.seed)
            print(", ".join(f"{r['name']} {r['seconds']:.1f}s" for r in rows[-len(methods(device)) :]), flush=True)
    print()
    print(
        "| shape (out x in) | spectrum | method | seconds | vs svd fp32 | max err of max-cos (as computed / fp16) "
        "| counts 0.3/0.5/0.7 = float64 | max abs(U^T U - I) |"
    )
    print("|---|---|---|---:|---:|---|---|---:|")
    for r in rows:
        base = next(x for x in rows if x["shape"] == r["shape"] and x["spectrum"] == r["spectrum"])["seconds"]
        print(
            f"| {r['shape']} | {r['spectrum']} | {r['name']} | {r['seconds']:.2f} | {base / r['seconds']:.2f}x "
            f"| {r['cos_err']:.1e} / {r['cos16_err']:.1e} | {'yes' if r['counts_ok'] else 'NO'} ({r['counts']}) "
            f"| {r['orth']:.1e} |"
        )


if __name__ == "__main__":
    main()
