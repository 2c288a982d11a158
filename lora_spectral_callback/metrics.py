"""Spectral metrics of a fine-tuned matrix: intruder dimensions and effective rank.

Pure torch. Definitions follow Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
(arXiv 2410.21228), and Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "pretrained_left_basis",
    "max_abs_cosine",
    "count_intruders",
    "effective_rank",
    "low_rank_singular_values",
    "basis_rounding_error",
]


def pretrained_left_basis(W0: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Thin left singular basis ``U0`` of the pretrained matrix (``torch.linalg.svd(full_matrices=False)``).

    The paper compares against *all* of these columns, not only the top ones, so the whole thin basis is kept.
    Columns come in descending singular-value order, so ``U0[:, :p]`` also seeds the solver.
    """
    U0, _, _ = torch.linalg.svd(W0.to(dtype), full_matrices=False)
    return U0


def basis_rounding_error(dtype: torch.dtype) -> float:
    """Largest change a stored basis dtype can make to a cosine between unit vectors.

    Rounding each entry of a unit vector by a relative ``u`` (unit roundoff) changes its dot product with another
    unit vector by at most ``u * sum|a_i b_i| <= u``; fp16 storage therefore moves a cosine by at most 4.9e-4.
    """
    return torch.finfo(dtype).eps / 2


def max_abs_cosine(U: Tensor, U0: Tensor, chunk: int = 1024) -> Tensor:
    """Paper Alg. 1: for each column of ``U`` (unit vectors), ``max_j |<U[:, i], U0[:, j]>|`` over all of ``U0``.

    ``U0`` may be stored in a narrower dtype or on another device (CPU, memory-mapped); it is read in column
    chunks and upcast to ``U``'s dtype, so the transient memory is ``m * chunk`` values.
    """
    best = torch.zeros(U.shape[1], dtype=U.dtype, device=U.device)
    for j in range(0, U0.shape[1], chunk):
        block = U0[:, j : j + chunk].to(U.device).to(U.dtype)  # move the narrow dtype, widen on the device
        best = torch.maximum(best, (block.T @ U).abs().amax(dim=0))
    return best


def count_intruders(max_cos: Tensor, epsilon: float | Sequence[float]) -> int | dict[float, int]:
    """Paper Def. 3.1: a top singular vector is an intruder iff its max |cos| is strictly below ``epsilon``.

    One decomposition serves any number of thresholds: pass a sequence to get ``{epsilon: count}``.
    """
    if isinstance(epsilon, Sequence):
        return {float(e): int((max_cos < e).sum()) for e in epsilon}
    return int((max_cos < epsilon).sum())


def effective_rank(singular_values: Tensor) -> float:
    """Roy & Vetterli 2007: ``exp(H(p))`` with ``p = sigma / sum(sigma)``; 0 for a zero matrix.

    Ranges from 1 (one direction carries everything) to the number of non-zero singular values (all equal).
    """
    s = singular_values.double().abs()
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def low_rank_singular_values(B: Tensor, A: Tensor) -> Tensor:
    """Exact non-zero singular values of ``B @ A`` (m x r times r x n) in O((m+n) r^2).

    With ``B = Q_B R_B`` and ``A^T = Q_A R_A``, ``B A = Q_B (R_B R_A^T) Q_A^T`` and the orthonormal factors
    do not change singular values, so an r x r SVD suffices.
    """
    R_B = torch.linalg.qr(B.double(), mode="r").R
    R_A = torch.linalg.qr(A.double().T, mode="r").R
    return torch.linalg.svdvals(R_B @ R_A.T)
