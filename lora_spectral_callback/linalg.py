"""Top singular triplets of a low-rank-updated matrix, computed without forming it.

Pure torch. The matrix is ``M = diag(d) (W0 + B A)`` (``d`` optional, for DoRA's row rescaling): a dense
pretrained weight plus a rank-r update. We need its top-k *left* singular vectors accurately enough to decide,
for each, on which side of a threshold its cosine with the pretrained basis lies.

The solver is block subspace iteration with a Rayleigh-Ritz step (Halko, Martinsson & Tropp 2011, "Finding
structure with randomness", Alg. 4.4 + 5.1; Saad 2011, "Numerical Methods for Large Eigenvalue Problems",
Sec. 5.1), warm-started from a block that already nearly contains the answer (the pretrained top singular
vectors plus the columns of B, or the previous measurement's vectors), and stopped by an a-posteriori error
bound rather than a fixed iteration count: for a Ritz pair ``(sigma, u, v)`` with ``M^T u = sigma v``, the
eigen-residual of ``M M^T`` is ``sigma * ||M v - sigma u||`` and the Davis-Kahan sin-theta theorem bounds the
angle to the true singular vector by that residual over the spectral gap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LowRankUpdatedMatrix", "TopSVD", "top_singular_triplets", "exact_top_singular_triplets"]


@dataclass
class LowRankUpdatedMatrix:
    """``M = diag(row_scale) @ (W0 + B @ A)`` as an operator (m x n).

    All tensors must share one floating dtype (fp32 or fp64) and device; ``B``/``A`` carry the LoRA scaling
    already. Products cost O(mnp + (m+n)rp) and never allocate an m x n matrix.
    """

    W0: Tensor
    B: Tensor | None = None
    A: Tensor | None = None
    row_scale: Tensor | None = None

    def __post_init__(self) -> None:
        if self.W0.dim() != 2:
            raise ValueError(f"W0 must be a matrix, got shape {tuple(self.W0.shape)}")
        if (self.B is None) != (self.A is None):
            raise ValueError("B and A must both be given or both be None")
        if self.B is not None and (self.B.shape[0] != self.W0.shape[0] or self.A.shape[1] != self.W0.shape[1]):
            raise ValueError(
                f"B {tuple(self.B.shape)} @ A {tuple(self.A.shape)} does not match W0 {tuple(self.W0.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)  # type: ignore[return-value]

    def matmul(self, X: Tensor) -> Tensor:
        """``M @ X`` for X of shape (n, p)."""
        Y = self.W0 @ X
        if self.B is not None:
            Y = Y + self.B @ (self.A @ X)
        return Y if self.row_scale is None else self.row_scale[:, None] * Y

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``M^T @ Y`` for Y of shape (m, p)."""
        if self.row_scale is not None:
            Y = self.row_scale[:, None] * Y
        X = self.W0.T @ Y
        if self.B is not None:
            X = X + self.A.T @ (self.B.T @ Y)
        return X

    def dense(self) -> Tensor:
        """The full matrix; only for small matrices and tests."""
        M = self.W0 if self.B is None else self.W0 + self.B @ self.A
        return M if self.row_scale is None else self.row_scale[:, None] * M


@dataclass
class TopSVD:
    """Top-k singular triplets and how far they can be trusted."""

    U: Tensor  # (m, k) left singular vectors
    S: Tensor  # (k,) singular values, descending
    V: Tensor  # (n, k) right singular vectors
    error: Tensor  # (k,) bound on ||u_computed - u_true|| (0 for an exact SVD)
    iterations: int  # subspace iterations run (0 for an exact SVD)
    converged: bool
    block: Tensor | None = None  # (m, p) all Ritz left vectors, descending: the next measurement's warm start


def exact_top_singular_triplets(M: LowRankUpdatedMatrix, k: int) -> TopSVD:
    """Top-k of a full LAPACK SVD in float64; cheaper than iterating when the matrix is small."""
    U, S, Vh = torch.linalg.svd(M.dense().double(), full_matrices=False)
    k = min(k, S.numel())
    dtype = M.W0.dtype
    return TopSVD(
        U[:, :k].to(dtype), S[:k].to(dtype), Vh[:k].T.to(dtype), torch.zeros(k, dtype=dtype, device=S.device), 0, True
    )


def _orthonormal_basis(X: Tensor) -> Tensor:
    return torch.linalg.qr(X, mode="reduced").Q


def _rayleigh_ritz(M: LowRankUpdatedMatrix, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best approximations to M's singular triplets from the column space of Q (Q^T M = U_s S V^T)."""
    Z = M.rmatmul(Q)  # (n, p) = M^T Q
    Qz, Rz = torch.linalg.qr(Z, mode="reduced")
    Us, S, Wh = torch.linalg.svd(Rz.T)  # Q^T M = Rz^T Qz^T = Us S (Qz Wh^T)^T
    return Q @ Us, S, Qz @ Wh.T


def _ritz_vector_error(S: Tensor, R: Tensor, k: int, full: bool = False) -> Tensor:
    """Bound on ``||u_ritz - u_true||`` for each of the top-k Ritz left vectors.

    Saad 2011, Thm. 4.6 with the Davis-Kahan sin-theta theorem, applied to every leading sub-block
    ``U[:, :j]`` (j >= k) of Ritz vectors: its residual against ``M M^T`` is exactly ``R[:, :j] diag(S[:j])``
    (``R`` = ``M V - U S``, orthogonal to the block), so with ``gamma_j`` its norm a true singular vector lies
    within ``gamma_j / (S_i^2 - S_{j+1}^2)`` of the sub-block, and Rayleigh-Ritz picks it out up to a factor
    ``sqrt(1 + gamma_j^2 / delta_i^2)`` (``delta_i``: distance to the other Ritz values). Each j gives a valid
    bound, so the smallest is kept: a slowly converging bottom of the block does not spoil the top, and a
    near-tie between S_k and S_{k+1} is bridged by a larger sub-block. The bound is second order in ``gamma``
    for clustered values. An angle bound also bounds the change of any cosine with a fixed unit vector, which
    is what the intruder test needs. (The spectrum beyond the block is assumed below the block's last Ritz value;
    a ``full`` block spans the whole column space, so nothing lies beyond it.)
    """
    tiny = torch.finfo(S.dtype).tiny
    lam = S**2
    gamma = torch.sqrt(torch.cumsum((torch.linalg.vector_norm(R, dim=0) * S) ** 2, dim=0))  # Frobenius >= spectral
    gaps = (lam[:, None] - lam[None, :]).abs()
    gaps.fill_diagonal_(float("inf"))
    delta = gaps.min(dim=1).values.clamp_min(tiny)[:k]
    beyond = torch.cat([lam[1:], lam.new_zeros(1)]) if full else lam[1:]  # top of the spectrum past column j
    j = torch.arange(k - 1, beyond.numel(), device=S.device)  # last column of each sub-block
    g = gamma[j][:, None]  # (blocks, 1)
    outside = (lam[None, :k] - beyond[j][:, None]).clamp_min(tiny)  # (blocks, k)
    bounds = g / outside * torch.sqrt(1 + (g / delta[None, :]) ** 2)
    return bounds.amin(dim=0).clamp(max=2.0) if bounds.numel() else torch.full_like(delta, 2.0)


def top_singular_triplets(
    M: LowRankUpdatedMatrix,
    k: int,
    start: Tensor | None = None,
    *,
    oversample: int = 10,
    tol: float = 1e-2,
    max_iter: int = 100,
    stall_patience: int = 5,
    max_block: int | None = None,
    needed_accuracy: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> TopSVD:
    """Top-k singular triplets of ``M`` by warm-started block subspace iteration with Rayleigh-Ritz.

    ``start`` (m x p0) seeds the block, its first ``k + oversample`` columns used (pass the previous call's
    ``block`` to warm-start); the columns of ``M.B`` are always added since the update's range is where new
    directions appear. Without a start, or when the seed is thin, Gaussian columns from ``generator`` fill
    the block to ``k + oversample`` (the global RNG is never touched).

    Iteration stops once every top-k vector's error bound is below ``tol`` and below what
    ``needed_accuracy(U_k)`` asks per vector (the distance of its cosine from a decision threshold; a vector
    whose cosine is certainly closer to a threshold than that allows is left as it is — no iteration can
    decide it). When the bound stops shrinking for ``stall_patience`` iterations (singular values too close for
    the block to separate them) the block is doubled with fresh Gaussian columns, up to ``max_block`` columns
    (default ``8 * (k + oversample)``; a block spanning the whole space is exact). ``converged`` is False only
    if ``max_iter`` or a stall at the largest block ended the iteration.
    """
    m, n = M.shape
    k = min(k, m, n)
    p = min(k + oversample, m, n)
    max_block = min(max_block or 8 * (k + oversample), m, n)
    cols = [] if start is None else [start[:, :p]]
    if M.B is not None:
        cols.append(M.B)
    have = sum(c.shape[1] for c in cols)
    if have < p:
        cols.append(_gaussian(M, p - have, generator))
    Q = _orthonormal_basis(torch.cat(cols, dim=1)[:, : min(m, n)])
    best, stalled = float("inf"), 0
    for it in range(1, max_iter + 1):
        U, S, V = _rayleigh_ritz(M, Q)
        MV = M.matmul(V)
        error = _ritz_vector_error(S, MV - U * S, k, full=Q.shape[1] >= min(m, n))
        unsettled = error > tol
        if not bool(unsettled.any()) and needed_accuracy is not None:  # only then is the margin worth computing
            needed = needed_accuracy(U[:, :k])
            unsettled = (error > needed) & (needed + error > 0)
        if not bool(unsettled.any()):
            return TopSVD(U[:, :k], S[:k], V[:, :k], error, it, True, U)
        # (Only an informative bound counts: far from convergence it sits at its cap of 2 for a while.)
        worst = float(error[unsettled].max())
        if worst < 0.7 * best:
            best, stalled = worst, 0
        elif worst < 1.0:
            stalled += 1
        Q = _orthonormal_basis(MV)  # one step of subspace iteration: span(M M^T Q)
        if stalled >= stall_patience:
            if Q.shape[1] >= max_block:
                break
            grow = min(Q.shape[1], max_block - Q.shape[1])
            Q = _orthonormal_basis(torch.cat([Q, _gaussian(M, grow, generator)], dim=1))
            best, stalled = float("inf"), 0
    return TopSVD(U[:, :k], S[:k], V[:, :k], error, it, False, U)


def _gaussian(M: LowRankUpdatedMatrix, columns: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(M.shape[0], columns, dtype=M.W0.dtype, device=M.W0.device, generator=generator)
