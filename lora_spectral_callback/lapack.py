"""Small dense decompositions by LAPACK on the CPU, whatever device the solver works on.

Pure torch. The solver's Rayleigh-Ritz ``eigh``, its error bound's batched ``eigvalsh`` and the new block's ``svd``
are p x p problems (p at most a few hundred). On CUDA, PyTorch computes a float32 ``eigh`` of 32 to 512 columns
with cuSOLVER's Jacobi solver (``syevj``), whose eigenvectors are too loose for the error bound
(``benchmarks/gpu_check.py``; docs/performance.md, "GPU check"); a round trip of p x p values costs less.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["on_cpu"]


def on_cpu(decomposition: Callable[[Tensor], Any], A: Tensor) -> Any:
    """``decomposition(A)`` computed by LAPACK on the CPU, its result (a tensor or a tuple of them) back on ``A``'s
    device. On an H200, cuSOLVER's float32 ``eigh`` gave Rayleigh-Ritz eigenvectors orthogonal to 9e-5 (LAPACK's to
    1e-6) and a 4096 x 4096 solve never settled its bound in 100 steps; the bound's batched ``eigvalsh`` was slower
    there than this round trip, and ``svd`` no faster."""
    if A.device.type == "cpu":
        return decomposition(A)
    out = decomposition(A.cpu())
    if isinstance(out, Tensor):
        return out.to(A.device)
    return tuple(t.to(A.device) for t in out)
