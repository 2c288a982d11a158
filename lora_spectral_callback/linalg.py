"""Top singular triplets of a low-rank-updated matrix, computed without forming it.

Pure torch. The matrix is ``M = diag(d) (W0 + B A)`` (``d`` optional, for DoRA's row rescaling): a dense
pretrained weight plus a rank-r update. We need its top-k *left* singular vectors accurately enough to decide,
for each, on which side of a threshold its cosine with the pretrained basis lies.

The solver is a block Krylov method for the eigenvectors of ``M M^T`` with Rayleigh-Ritz extraction (block
Lanczos with full reorthogonalization and thick restart: Saad 2011, "Numerical Methods for Large Eigenvalue
Problems", Ch. 6-7; Wu & Simon 2000; for the randomized view, Halko, Martinsson & Tropp 2011, "Finding structure
with randomness", and Musco & Musco 2015, "Randomized block Krylov methods"), warm-started from a block that
already nearly contains the answer (the pretrained top singular vectors plus the columns of B, or the previous
measurement's vectors). Unlike plain subspace iteration, which keeps only the last block, the search space keeps
every direction it has seen, so flat spectra (near-equal singular values, the norm for pretrained weights)
converge in a few steps. It stops on an a-posteriori error bound rather than an iteration count: the residual
``M M^T U - U diag(S^2)`` of every leading block of Ritz vectors is computed exactly from products with ``M``, and
the Davis-Kahan sin-theta theorem bounds each vector's angle to the true singular vector by that residual over
the spectral gap. Between solves the search space is handed on with its products with ``W0`` (LoRA's frozen base,
:class:`KrylovSpace`), so a warm solve re-examines it for one product ``W0 A^T`` and pays only for new directions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .lapack import on_cpu
from .products import matmul as mm
from .products import split_rounding

__all__ = ["LowRankUpdatedMatrix", "TopSVD", "KrylovSpace", "top_singular_triplets", "exact_top_singular_triplets"]

BASE_ROWS = 512  # rows of W0 per product on CPU (LowRankUpdatedMatrix.base_matmul)


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
        if (
            self.B is not None
            and self.A is not None
            and (self.B.shape[0] != self.W0.shape[0] or self.A.shape[1] != self.W0.shape[1])
        ):
            raise ValueError(
                f"B {tuple(self.B.shape)} @ A {tuple(self.A.shape)} does not match W0 {tuple(self.W0.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)  # type: ignore[return-value]

    def matmul(self, X: Tensor) -> Tensor:
        """``M @ X`` for X of shape (n, p)."""
        Y = self.base_matmul(X)
        if self.B is not None and self.A is not None:
            Y = Y + mm(self.B, mm(self.A, X))
        return Y if self.row_scale is None else self.row_scale[:, None] * Y

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``M^T @ Y`` for Y of shape (m, p)."""
        if self.row_scale is not None:
            Y = self.row_scale[:, None] * Y
        X = self.base_rmatmul(Y)
        if self.B is not None and self.A is not None:
            X = X + mm(self.A.T, mm(self.B.T, Y))
        return X

    def base_matmul(self, X: Tensor) -> Tensor:
        """``W0 @ X``, as ``(X^T W0^T)^T``: for thin X, MKL's kernel for a thin left operand streams W0 faster on CPU
        than the one for a thin right operand (the warm measurements of ``benchmarks/bench_detection.py``), and
        faster still a block of ``BASE_ROWS`` rows of W0 at a time (one thread, 20 columns: 4096 x 4096 15.1 ->
        12.6 ms, 14336 x 4096 74.5 -> 48.7 ms, medians of 15 in a one-off timing, 2026-12-04); a GPU gets one
        product."""
        W0, Xt = self.W0, X.T
        if W0.device.type != "cpu" or W0.shape[0] <= BASE_ROWS:
            return mm(Xt, W0.T).T
        out = Xt.new_empty(Xt.shape[0], W0.shape[0])
        for i in range(0, W0.shape[0], BASE_ROWS):
            out[:, i : i + BASE_ROWS] = mm(Xt, W0[i : i + BASE_ROWS].T)
        return out.T

    def base_rmatmul(self, Y: Tensor) -> Tensor:
        """``W0^T @ Y``, reading W0 row by row: 1.5-2x faster than ``W0.T @ Y`` on CPU for thin Y."""
        return mm(Y.T, self.W0).T

    def dense(self) -> Tensor:
        """The full matrix; only for small matrices and tests."""
        M = self.W0 if self.B is None or self.A is None else self.W0 + mm(self.B, self.A)
        return M if self.row_scale is None else self.row_scale[:, None] * M


@dataclass(frozen=True)
class KrylovSpace:
    """Where the next solve on the same matrix starts: the top Ritz left vectors ``Q`` (orthonormal, descending)
    and, when ``M`` has no row scale, ``W0^T Q`` and ``W0 W0^T Q`` with a checksum of the ``W0`` they belong to.

    While ``W0`` stays the same (LoRA's frozen base), the next solve gets ``M^T Q`` and ``M M^T Q`` for any new
    factors B, A from these at O((m + n) r) per column, plus one product ``W0 A^T``: the whole warm block is
    re-examined without a pass over ``W0`` per column. A changed ``W0`` (checksum) makes ``Q`` a plain start block.
    Never modified in place, so it can be kept and reused.
    """

    Q: Tensor
    W0tQ: Tensor | None = None
    W0W0tQ: Tensor | None = None
    checksum: float | None = None

    @property
    def shape(self) -> torch.Size:
        return self.Q.shape


@dataclass
class TopSVD:
    """Top-k singular triplets and how far they can be trusted."""

    U: Tensor  # (m, k) left singular vectors
    S: Tensor  # (k,) singular values, descending
    V: Tensor  # (n, k) right singular vectors
    error: Tensor  # (k,) bound on ||u_computed - u_true|| (0 for an exact SVD)
    iterations: int  # Rayleigh-Ritz steps run (0 for an exact SVD)
    converged: bool
    block: KrylovSpace  # the next solve's warm start


def exact_top_singular_triplets(M: LowRankUpdatedMatrix, k: int) -> TopSVD:
    """Top-k of a full LAPACK SVD in float64; cheaper than iterating when the matrix is small."""
    U, S, Vh = torch.linalg.svd(M.dense().double(), full_matrices=False)
    k = min(k, S.numel())
    dtype = M.W0.dtype
    Uk = U[:, :k].to(dtype)
    zeros = torch.zeros(k, dtype=dtype, device=S.device)
    return TopSVD(Uk, S[:k].to(dtype), Vh[:k].T.to(dtype), zeros, 0, True, KrylovSpace(Uk))


def _rayleigh_ritz(Q: Tensor, Z: Tensor, MZ: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ritz pairs of ``M M^T`` on span(Q), from ``Z = M^T Q`` and ``MZ = M Z``; no product with ``M`` is needed.

    ``Q^T M M^T Q = Z^T Z = Y diag(theta) Y^T`` gives the Ritz values ``theta`` (descending, all of them), the top
    ``top`` Ritz vectors ``U = Q Y[:, :top]`` and their exact eigen-residuals ``M M^T U - U diag(theta) = MZ Y -
    U diag(theta)`` (only those: each further vector costs two products the length of ``Q``, and the error bound
    uses no more). Forming the Gram matrix squares condition numbers, which costs accuracy only in the small Ritz
    values; the residuals, hence the error bounds, are computed from the products themselves and stay valid.
    Returns ``(Y, theta, U, residuals)``.
    """
    theta, Y = on_cpu(torch.linalg.eigh, mm(Z.T, Z))
    theta, Y = theta.flip(0).clamp_min(0), Y.flip(1)
    U = mm(Q, Y[:, :top])
    return Y, theta, U, mm(MZ, Y[:, :top]) - U * theta[:top]


def _extend(Q: Tensor | None, X: Tensor, drop: float) -> Tensor:
    """Orthonormal basis of the part of ``X`` orthogonal to span(Q) (classical Gram-Schmidt twice, which is enough:
    Giraud et al. 2005), leaving out directions below ``drop`` times the largest column of ``X`` (the scale stays
    on the device: the only host syncs are the SVD's and the one that sizes the kept block)."""
    scale = torch.linalg.vector_norm(X, dim=0).amax() if X.numel() else X.new_zeros(())
    if Q is not None:
        for _ in range(2):
            X = X - mm(Q, mm(Q.T, X))
    Qx, Rx = torch.linalg.qr(X, mode="reduced")
    Ur, s, _ = on_cpu(torch.linalg.svd, Rx)
    X = mm(Qx, Ur[:, s > drop * scale])
    if Q is not None:  # dropped noise aside, one more pass keeps the basis orthogonal to working precision
        X = X - mm(Q, mm(Q.T, X))
    return torch.linalg.qr(X, mode="reduced").Q


def _ritz_vector_error(theta: Tensor, U: Tensor, R: Tensor, k: int, rounding: float, candidates: int = 16) -> Tensor:
    """Bound on ``||u_ritz - u_true||`` (signs aligned) for each of the top-k Ritz left vectors ``U[:, :k]``.

    ``theta``: Ritz values of ``A = M M^T`` (descending, all of the search space's); ``U``, ``R``: the top Ritz
    vectors and their computed eigen-residuals ``A U - U diag(theta)``. Davis-Kahan sin-theta theorem (as in Saad
    2011, Thm. 4.6 with Sec. 4.3) for every leading sub-block ``U[:, :j]`` (k <= j <= the vectors given, and
    below the space's size): with ``gamma_j = ||R[:, :j]||_2`` a true eigenvector ``u_i``
    satisfies ``||(I - U_j U_j^T) u_i|| <= gamma_j / (theta_i - theta_{j+1})``, and Rayleigh-Ritz picks it out of
    the sub-block up to a factor ``sqrt(1 + gamma_j^2 / delta_i^2)`` (``delta_i``: distance to the other Ritz
    values). Every j gives a valid bound, so the smallest is kept: a slowly converging bottom of the block does not
    spoil the top, and a near-tie between theta_k and theta_{k+1} is bridged by a larger sub-block. The spectral
    norm (exact, from the Gram matrix of R; up to ``candidates`` sub-block sizes are tried) is up to sqrt(j)
    tighter than the Frobenius norm.

    Rounding makes the computed ``U`` only nearly diagonalize ``U^T A U``; its off-diagonal part ``C = U^T R``
    (which the computed residuals contain) turns a vector towards its neighbours by at most
    ``||C e_i|| / (delta_i - ||C||_2)`` (Davis-Kahan on the small matrix, Weyl for its gap), which is added: it
    matters only for near-equal Ritz values (``||C||_F >= ||C||_2`` stands in for it: larger, so the bound stays
    valid, and no SVD). The sine is turned into the chord ``||u - u_ritz|| = 2 sin(angle/2)``, which bounds the
    change of any cosine with a fixed unit vector, and the ``rounding`` allowance (:func:`_rounding`) is added. (The spectrum of ``A`` beyond the sub-block is assumed below the next Ritz value ``theta_{j+1}``: the
    search space is assumed not to have missed an eigenvalue above it, as in all Krylov error estimates.)
    """
    dtype, tiny = theta.dtype, torch.finfo(theta.dtype).tiny
    last = min(theta.numel() - 1, U.shape[1])  # sub-block sizes j in [k, last]: theta[j] is the value beyond
    if last < k:
        return torch.full((k,), 2**0.5, dtype=dtype, device=theta.device)
    # steps >= 1 apart, so rounding keeps them distinct (torch.unique would cost a host sync)
    j = torch.linspace(k, last, min(candidates, last - k + 1), device=theta.device).round().long()
    G = mm(R[:, :last].T, R[:, :last])
    inside = (torch.arange(last, device=theta.device)[None, :] < j[:, None]).to(dtype)
    blocks = G * inside[:, :, None] * inside[:, None, :]  # the leading j x j blocks of G, zero-padded
    gamma = on_cpu(torch.linalg.eigvalsh, blocks)[:, -1].clamp_min(0).sqrt()[:, None]
    gaps = (theta[:, None] - theta[None, :]).abs()
    gaps.fill_diagonal_(float("inf"))
    delta = gaps.min(dim=1).values.clamp_min(tiny)[:k]
    outside = (theta[None, :k] - theta[j][:, None]).clamp_min(tiny)  # (sub-blocks, k)
    C = mm(U.T, R)
    mixing = torch.linalg.vector_norm(C[:, :k], dim=0) / (delta - torch.linalg.matrix_norm(C)).clamp_min(tiny)
    sine = ((gamma / outside * torch.sqrt(1 + (gamma / delta) ** 2)).amin(dim=0) + mixing).clamp(max=1.0)
    return sine * torch.sqrt(2 / (1 + torch.sqrt(1 - sine**2))) + rounding


def _rounding(m: int, dtype: torch.dtype, device: torch.device) -> float:
    """Allowance for rounding in a computed unit m-vector; also the finest accuracy a solve can promise:
    ``8 sqrt(m) (eps + s)``, with ``s`` what split float32 products add per unit-vector product where training set
    TF32/bfloat16 matmuls (:func:`.products.split_rounding`, 2^-18; 0 with IEEE products)."""
    return 8 * m**0.5 * (torch.finfo(dtype).eps + split_rounding(device, dtype))


class _Space:
    """A growing search space ``Q`` with ``Z = M^T Q`` and ``MZ = M M^T Q``.

    Without a row scale, W0's share of the products is kept apart (``W0^T Q``, ``W0 W0^T Q``) at no extra pass
    over ``W0`` (the update's share costs O((m + n) r) per column, given ``W0 A^T`` once per solve), so that it
    can be handed on (:class:`KrylovSpace`).
    """

    def __init__(self, M: LowRankUpdatedMatrix) -> None:
        self.M = M
        self.split = M.row_scale is None
        self._W0At: Tensor | None = None
        self.Q = self.MZ = self.W0W0tQ = M.W0.new_zeros(M.shape[0], 0)
        self.Z = self.W0tQ = M.W0.new_zeros(M.shape[1], 0)

    @property
    def W0At(self) -> Tensor:
        if self._W0At is None:
            assert self.M.A is not None
            self._W0At = self.M.base_matmul(self.M.A.T)
        return self._W0At

    def M_At(self) -> Tensor:
        """``M A^T``: the update's row space mapped by ``M``, where the update-dominated top vectors lie."""
        M = self.M
        assert M.B is not None and M.A is not None
        return self.W0At + mm(M.B, mm(M.A, M.A.T)) if self.split else M.matmul(M.A.T)

    def add(self, Q: Tensor, W0tQ: Tensor | None = None, W0W0tQ: Tensor | None = None) -> None:
        """Append orthonormal columns ``Q`` (orthogonal to the space), given their W0 products if known."""
        M, B, A = self.M, self.M.B, self.M.A
        if not self.split:
            Z = M.rmatmul(Q)
            self._append(Q, Z, M.matmul(Z))
            return
        if W0tQ is None:
            W0tQ = M.base_rmatmul(Q)
        BtQ = None if B is None else mm(B.T, Q)
        Z = W0tQ if BtQ is None or A is None else W0tQ + mm(A.T, BtQ)
        if W0W0tQ is None:
            W0Z = M.base_matmul(Z)  # = W0 W0^T Q + W0 A^T B^T Q
            W0W0tQ = W0Z if BtQ is None else W0Z - mm(self.W0At, BtQ)
        else:
            W0Z = W0W0tQ if BtQ is None else W0W0tQ + mm(self.W0At, BtQ)
        MZ = W0Z if B is None or A is None else W0Z + mm(B, mm(A, Z))
        self._append(Q, Z, MZ, W0tQ, W0W0tQ)

    def _append(
        self, Q: Tensor, Z: Tensor, MZ: Tensor, W0tQ: Tensor | None = None, W0W0tQ: Tensor | None = None
    ) -> None:
        self.Q, self.Z, self.MZ = (torch.cat(pair, dim=1) for pair in ((self.Q, Q), (self.Z, Z), (self.MZ, MZ)))
        if W0tQ is not None and W0W0tQ is not None:
            self.W0tQ, self.W0W0tQ = torch.cat([self.W0tQ, W0tQ], dim=1), torch.cat([self.W0W0tQ, W0W0tQ], dim=1)

    def rotate(self, Y: Tensor) -> None:
        """Replace the space by ``Q Y`` (orthonormal ``Y``); every product follows linearly, at no pass over W0."""
        self.Q, self.Z, self.MZ = mm(self.Q, Y), mm(self.Z, Y), mm(self.MZ, Y)
        if self.split:
            self.W0tQ, self.W0W0tQ = mm(self.W0tQ, Y), mm(self.W0W0tQ, Y)

    def handover(self, Y: Tensor, checksum: float | None) -> KrylovSpace:
        """The subspace ``Q Y``, with its W0 products when they were kept, for the next solve."""
        if not self.split:
            return KrylovSpace(mm(self.Q, Y))
        return KrylovSpace(mm(self.Q, Y), mm(self.W0tQ, Y), mm(self.W0W0tQ, Y), checksum)


def _checksum(W0: Tensor) -> float:
    """A fingerprint of W0 for :class:`KrylovSpace` (a changed weight changes its sum: one cheap streaming pass)."""
    return float(W0.sum())


def top_singular_triplets(
    M: LowRankUpdatedMatrix,
    k: int,
    start: Tensor | KrylovSpace | None = None,
    *,
    oversample: int = 10,
    tol: float = 1e-2,
    max_iter: int = 100,
    stall_patience: int = 5,
    max_block: int | None = None,
    needed_accuracy: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    checksum: float | None = None,
) -> TopSVD:
    """Top-k singular triplets of ``M`` by warm-started block Krylov iteration with Rayleigh-Ritz.

    ``start`` seeds the search space: a previous call's ``block`` (a :class:`KrylovSpace` of its top
    ``1.5 (k + oversample)`` Ritz vectors, reused with its products while ``W0`` is unchanged, else as a start
    block), or an m x p0 block of which the first ``k + oversample`` columns are used, together with the columns of
    ``M.B`` and ``M A^T`` (the update's column space, and its row space mapped by ``M``: where the update-dominated
    top vectors lie).
    Without a start, or when the seed is thin, Gaussian columns from ``generator`` fill the block to
    ``k + oversample`` (the global RNG is never touched).

    Each step costs one product with ``M^T`` and one with ``M`` on the new columns only: the space grows by the
    residual directions of the top ``k + oversample // 2`` Ritz vectors (the next block-Krylov directions; a
    product streams all of ``W0`` whatever its width, so wide steps cost little more and save steps). Iteration
    stops once every top-k vector's error bound is below ``tol`` and below what ``needed_accuracy(U_k)`` asks per
    vector (the distance of its cosine from a decision threshold; a vector whose cosine is certainly closer to a
    threshold than that allows, or asks for less than rounding permits, is left as it is -- no iteration can decide
    it, and ``uncertain`` reports it). ``needed_accuracy`` is called at
    most once per step, and the tensor it was last called with is the returned ``U`` when that call settled
    everything, so the caller can keep what it computed. A space of ``max_block`` columns (default
    ``8 * (k + oversample)``) is thick-restarted from its top half of Ritz vectors, which costs no product. A space
    that would span ``min(m, n)`` columns is replaced by a dense float64 SVD, exact and cheaper at that size.
    ``converged`` is False if ``max_iter`` steps ended the iteration, or ``stall_patience`` steps without a 10%
    smaller bound (singular values too close for working precision to separate them). ``checksum``: ``float(W0.sum())``
    when the caller has it already (a finiteness test), which spares a pass over ``W0``.
    """
    m, n = M.shape
    k = min(k, m, n)
    p = min(k + oversample, m, n)
    max_block = max(min(max_block or 8 * (k + oversample), m, n), p + k)
    width = k + oversample // 2  # new directions per step
    drop = torch.finfo(M.W0.dtype).eps ** 0.5
    floor = _rounding(m, M.W0.dtype, M.W0.device)
    best, stalled, worst = float("inf"), 0, float("inf")
    space = _Space(M)
    checksum = (_checksum(M.W0) if checksum is None else checksum) if space.split else None
    if (
        isinstance(start, KrylovSpace)
        and start.W0tQ is not None
        and start.W0W0tQ is not None
        and start.checksum is not None
        and start.checksum == checksum
    ):
        Q, Rq = torch.linalg.qr(start.Q, mode="reduced")  # orthonormal again to working precision, products alike
        Rinv = on_cpu(torch.linalg.inv, Rq.double()).to(Q.dtype)  # Rq ~ I, well conditioned; mm keeps fp32 under TF32
        space.add(Q, mm(start.W0tQ, Rinv), mm(start.W0W0tQ, Rinv))
    else:
        cols = [] if start is None else [(start.Q if isinstance(start, KrylovSpace) else start)[:, :p]]
        if M.B is not None and M.A is not None:
            cols += [M.B, space.M_At()]
        have = sum(c.shape[1] for c in cols)
        if have < p:
            cols.append(_gaussian(M, p - have, generator))
        space.add(_extend(None, torch.cat(cols, dim=1), drop))
    for it in range(1, max_iter + 1):
        Y, theta, U, R = _rayleigh_ritz(space.Q, space.Z, space.MZ, p)  # sub-blocks up to p bridge clusters
        error = _ritz_vector_error(theta, U, R, k, floor)
        Uk = U[:, :k]
        # the largest unsettled bound (error > 0: 0 means all settled) is the one host sync deciding a step
        worst = float(error.where(error > tol, 0).amax())
        if worst == 0 and needed_accuracy is not None:  # only then is the margin worth computing
            needed = needed_accuracy(Uk)
            # below the floor no solve in this precision decides
            worst = float(error.where((error > needed) & (needed > floor), 0).amax())
        if worst == 0 or it == max_iter:
            break
        # only an informative bound counts: far off it sits at its cap
        best, stalled = (worst, 0) if worst < 0.9 * best else (best, stalled + (worst < 1.0))
        if stalled >= stall_patience:
            break
        a = space.Q.shape[1]
        if a + width >= min(m, n):  # the next step would span everything: a dense SVD is exact and cheaper
            exact = exact_top_singular_triplets(M, k)
            exact.iterations = it
            return exact
        if a + width > max_block:  # thick restart: the top Ritz vectors, whose products are known already
            space.rotate(Y[:, : max_block // 2])
            R = R[:, : max_block // 2]
        Qn = _extend(space.Q, R[:, :width], drop)
        if Qn.shape[1] == 0:  # the space is invariant to working precision: nothing left to learn
            break
        space.add(Qn)
    V = mm(space.Z, Y[:, :k])  # M^T u = sigma v
    V = V / torch.linalg.vector_norm(V, dim=0).clamp_min(torch.finfo(V.dtype).tiny)
    keep = min(p + p // 2, Y.shape[1])  # wider than the start block: fewer steps on crowded spectra
    handover = space.handover(Y[:, :keep], checksum)
    return TopSVD(Uk, theta[:k].sqrt(), V, error, it, worst == 0, handover)


def _gaussian(M: LowRankUpdatedMatrix, columns: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(M.shape[0], columns, dtype=M.W0.dtype, device=M.W0.device, generator=generator)
