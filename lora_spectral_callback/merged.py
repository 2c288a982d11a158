"""The merged weight of an adapted layer as an operator: ``W0 + B A`` (and DoRA's row rescaling), never formed.

Pure torch. Every adapter kind reduces to this: its update as factors ``B A`` (several adapters or terms stacked
side by side, scalings folded into ``B``), so the solver of :mod:`.linalg` applies unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import LowRankUpdatedMatrix

__all__ = ["merged_operator", "stack_factors"]


def stack_factors(
    weights: list[tuple[Tensor, Tensor, float]], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    """``(B, A)`` with ``B @ A = sum_a s_a B_a A_a``: terms stacked side by side, scaling folded into B."""
    if not weights:
        return None
    B = torch.cat([B.to(device, dtype) * s for B, _, s in weights], dim=1)
    A = torch.cat([A.to(device, dtype) for _, A, _ in weights], dim=0)
    return B, A


def merged_operator(
    W0: Tensor, factors: tuple[Tensor, Tensor] | None, magnitude: Tensor | None
) -> LowRankUpdatedMatrix:
    """``W0 + B A`` as an operator, with DoRA's row rescaling when ``magnitude`` is given.

    DoRA (Liu et al. 2024) rescales each output row: ``m * (W0 + dW) / ||W0 + dW||_row``; the row norms are
    computed from the factors in O(mnr) without forming ``W0 + dW``. For a conv the norm runs over a whole output
    filter, i.e. a row of the flattened kernel.
    """
    if factors is None:
        return LowRankUpdatedMatrix(W0)
    B, A = factors
    row_scale = None
    if magnitude is not None:
        magnitude = magnitude.to(W0.device, W0.dtype)
        BA_rows = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||(B A)_i||^2
        cross = ((W0 @ A.T) * B).sum(dim=1)  # <W0_i, (B A)_i>
        norms = ((W0 * W0).sum(dim=1) + 2 * cross + BA_rows).clamp_min(0).sqrt()
        row_scale = magnitude / norms
    return LowRankUpdatedMatrix(W0, B, A, row_scale)
