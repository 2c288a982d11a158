"""Spectral metrics of a fine-tuned matrix: intruder dimensions and effective rank.

Pure torch. Definitions follow Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
(arXiv 2410.21228), and Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch
from torch import Tensor

from .products import matmul

__all__ = [
    "SNAPSHOT_METHODS",
    "fast_float64",
    "pretrained_basis_and_spectrum",
    "max_abs_cosine",
    "count_intruders",
    "intruder_energy_share",
    "intruder_sigma_ratio",
    "first_intruder_position",
    "effective_rank",
    "estimate_effective_rank",
    "low_rank_singular_values",
    "basis_rounding_error",
    "all_finite",
]


SNAPSHOT_METHODS = ("gram", "svd")

# compute capabilities with float64 at 1/2 of float32 (or faster, on tensor cores): P100, V100, A100/A30,
# H100/H200/GH200, B200/GB200. Others (T4, A10, L4, L40S, RTX cards, B300 at 10.3) run it at 1/32-1/64.
_FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def fast_float64(device: torch.device) -> bool:
    """Whether float64 arithmetic on ``device`` runs at a useful fraction of float32's: CPUs and datacenter GPUs."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) in _FAST_FLOAT64


def pretrained_basis_and_spectrum(
    W0: Tensor, dtype: torch.dtype = torch.float32, method: str = "gram"
) -> tuple[Tensor, Tensor]:
    """Thin left singular basis ``U0`` of the pretrained matrix (``min(m, n)`` columns, as
    ``torch.linalg.svd(full_matrices=False)`` gives) in ``dtype``, and its singular values (float64, CPU), which
    the same decomposition gives for free (pictures show them).

    The paper compares against *all* of these columns, not only the top ones, so the whole thin basis is kept,
    including directions of tiny or zero singular value. Columns come in descending singular-value order, so
    ``U0[:, :p]`` also seeds the solver. ``method``:

    - ``"gram"`` (default): a float64 symmetric eigendecomposition of the smaller Gram matrix. For ``m <= n`` the
      eigenvectors of ``W0 W0^T`` are all m left vectors, null space included. For ``m > n``,
      ``W0^T W0 = V S^2 V^T`` and ``U0 = W0 V / S``, re-orthonormalized by a QR when a singular value below
      ``1e-4 * S[0]`` makes that division inaccurate (its error is ~ ``eps (S[0] / S)^2``: rank-deficient
      weights). Faster than an fp32 SVD on CPU (``benchmarks/bench_snapshot.py``: 1.3-1.4x on square and tall
      matrices, 5.5-6x on wide ones, where LAPACK's SVD is slow) and accurate to float64: squaring the matrix costs
      accuracy only in singular values near ``1e-8 * S[0]``, whose vectors orthogonality to the rest determines.
    - ``"svd"``: LAPACK's SVD in ``dtype`` (the paper's code).
    """
    if method not in SNAPSHOT_METHODS:
        raise ValueError(f"method={method!r} is invalid: must be one of {SNAPSHOT_METHODS}")
    if method == "svd":
        U0, S, _ = torch.linalg.svd(W0.to(dtype), full_matrices=False)
        return U0, S.double().cpu()
    W = W0.double()
    m, n = W.shape
    lam, X = torch.linalg.eigh(W @ W.T if m <= n else W.T @ W)
    S, X = lam.flip(0).clamp_min(0).sqrt(), X.flip(1)
    if m <= n:
        return X.to(dtype), S.cpu()
    accurate = S / S[0] > 1e-4  # division error ~ eps64 (S[0] / S)^2 <= 1e-8
    U0 = W @ (X / torch.where(accurate, S, torch.ones_like(S)))
    if not bool(accurate.all()):  # Householder QR keeps the accurate columns' span and completes the rest
        U0 = torch.linalg.qr(U0, mode="reduced").Q
    return U0.to(dtype), S.cpu()


def basis_rounding_error(dtype: torch.dtype) -> float:
    """Largest change a stored basis dtype can make to a cosine between unit vectors.

    Rounding each entry of a unit vector by a relative ``u`` (unit roundoff) changes its dot product with another
    unit vector by at most ``u * sum|a_i b_i| <= u``; fp16 storage therefore moves a cosine by at most 4.9e-4.
    """
    return torch.finfo(dtype).eps / 2


def max_abs_cosine(U: Tensor, U0: Tensor, chunk: int | None = None) -> Tensor:
    """Paper Alg. 1: for each column of ``U`` (unit vectors), ``max_j |<U[:, i], U0[:, j]>|`` over all of ``U0``.

    ``U0`` may be stored in a narrower dtype or on another device (CPU, memory-mapped); it is read in chunks of
    ``chunk`` rows (contiguous in memory) and upcast to ``U``'s dtype, so the transient memory is ``chunk`` rows of
    ``U0`` plus the k x r products being summed. The default chunk keeps a widened chunk within a CPU core's L2
    cache (2 MB), where the upcast and the product run several times faster than from main memory (6x on a
    14336 x 4096 basis compared with column chunks), and widened into one reused buffer (a fresh chunk each time
    cost more in page faults than the product: 35-52 ms instead of ~11 ms for a 4096 x 4096 fp16 basis, one
    thread, ``benchmarks/bench_detection.py``'s layer, in a one-off instrumented run); on a GPU chunks are larger, to keep kernels big, and a CPU
    basis in pinned memory (:class:`~.basis_store.BasisStore` puts it there) is copied asynchronously.
    """
    if chunk is None:
        budget = 1 << 19 if U.device.type == "cpu" else 1 << 25  # values per widened chunk
        chunk = max(16, budget // max(U0.shape[1], 1))
    products = torch.zeros(U.shape[1], U0.shape[1], dtype=U.dtype, device=U.device)
    widen_in_place = U.device.type == "cpu" and U0.dtype != U.dtype and U0.device.type == "cpu"
    buffer = torch.empty(min(chunk, U0.shape[0]), U0.shape[1], dtype=U.dtype) if widen_in_place else None
    for i in range(0, U0.shape[0], chunk):
        rows = U0[i : i + chunk]
        if buffer is not None:  # one buffer for every chunk: a fresh one per chunk costs its page faults each time
            block = buffer[: rows.shape[0]].copy_(rows)
        else:
            # move the narrow dtype, widen on the device; from pinned memory the copy is asynchronous (ordered before
            # the product on this stream, and the basis is never written), from pageable memory it is staged anyway
            block = rows.to(U.device, non_blocking=True).to(U.dtype)
        products += matmul(U[i : i + chunk].T, block)  # float32 accuracy under TF32 (:mod:`.products`)
    return products.abs().amax(dim=1) if products.numel() else products.new_zeros(U.shape[1])


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN or Inf, in one streaming pass (a sum) instead of ``isfinite(t).all()``'s elementwise
    mask, which costs ~20x more on a large weight. IEEE arithmetic makes this exact: a NaN or Inf entry makes the
    sum NaN or Inf whatever the order of additions; only an overflowing sum of finite entries is ambiguous, and
    then the elementwise check decides."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


@overload
def count_intruders(max_cos: Tensor, epsilon: float) -> int: ...
@overload
def count_intruders(max_cos: Tensor, epsilon: Sequence[float]) -> dict[float, int]: ...
def count_intruders(max_cos: Tensor, epsilon: float | Sequence[float]) -> int | dict[float, int]:
    """Paper Def. 3.1: a top singular vector is an intruder iff its max |cos| is strictly below ``epsilon``.

    One decomposition serves any number of thresholds: pass a sequence to get ``{epsilon: count}``.
    """
    if isinstance(epsilon, Sequence):
        return {float(e): int((max_cos < e).sum()) for e in epsilon}
    return int((max_cos < epsilon).sum())


def intruder_energy_share(singular_values: Tensor, max_cos: Tensor, epsilon: float) -> float:
    """Share of the top-k spectral energy ``sum(sigma_i^2)`` of the merged weight carried by its intruders.

    ``sum_{max_cos_i < epsilon} sigma_i^2 / sum_i sigma_i^2`` over the same top-k triplets the count uses; in
    [0, 1], 0 when there is no intruder (or the top-k energy is 0). Unlike the count, it grows continuously with
    the intruders' singular values, which the paper (v3) ties to forgetting. It still reaches 1 when *every*
    top-k vector is an intruder; :func:`intruder_sigma_ratio` does not saturate.
    """
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    return float(energy[max_cos < epsilon].sum()) / total if total > 0 else 0.0


def intruder_sigma_ratio(singular_values: Tensor, max_cos: Tensor, epsilon: float, pretrained_sigma1: float) -> float:
    """Largest intruder singular value of the merged weight over sigma_1 of the *pretrained* weight.

    0 when there is no intruder (nothing intrudes: the natural floor of a magnitude, and it plots as a flat line);
    ``inf`` if the pretrained weight is zero and an intruder exists. Scale-free across layers and models, so one
    threshold means the same thing everywhere: 0.5 is an intruder half as strong as the layer's strongest
    pretrained direction.
    """
    intruding = singular_values.double()[max_cos < epsilon]
    if intruding.numel() == 0:
        return 0.0
    top = float(intruding.max())
    return top / pretrained_sigma1 if pretrained_sigma1 > 0 else math.inf


def first_intruder_position(max_cos: Tensor, epsilon: float) -> int:
    """1-based rank (in descending singular value order) of the strongest intruder; ``k + 1`` if there is none.

    ``k + 1`` rather than None/NaN: it stays a number TensorBoard can plot and alerts can compare, it is
    unambiguous (a real position is at most k), and "lower is worse" holds throughout.
    """
    hits = (max_cos < epsilon).nonzero()
    return int(hits[0, 0]) + 1 if hits.numel() else max_cos.numel() + 1


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
    do not change singular values, so an r x r SVD suffices. Values within the float64 rounding of the factors
    (``r * eps * ||B||_F ||A||_F``, the backward error of the QRs) are returned as 0: they cannot be told from an
    exact cancellation, such as ``[s B, -s B0] [A; A0]`` before a PiSSA adapter is trained.
    """
    B, A = B.double(), A.double()
    R_B = torch.linalg.qr(B, mode="r").R
    R_A = torch.linalg.qr(A.T, mode="r").R
    S = torch.linalg.svdvals(R_B @ R_A.T)
    noise = B.shape[1] * torch.finfo(torch.float64).eps * torch.linalg.norm(B) * torch.linalg.norm(A)
    return S.masked_fill(noise >= S, 0)


def estimate_effective_rank(
    delta: Tensor,
    probes: int = 16,
    steps: int = 64,
    deflate: int = 128,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
) -> float:
    """Roy & Vetterli's effective rank of a dense (full-rank) matrix without its full SVD.

    ``exp(H(p)) = S1 * exp(-S2 / S1)`` with ``S1 = sum(sigma)`` and ``S2 = sum(sigma log sigma)``. The top
    ``deflate`` singular values are computed (randomized subspace iteration, Halko et al. 2011) and summed exactly;
    the rest of the spectrum, which is what remains of ``delta`` after projecting out that subspace, is summed by
    stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): Hutchinson's trace estimator over ``probes``
    Rademacher vectors, ``v^T f(G) v`` from the Gauss rule of ``steps`` Lanczos iterations on the Gram matrix.
    Deflation matters: on a decaying spectrum the few large values dominate both sums and Hutchinson's estimator
    alone has errors of tens of percent. The error is measured in ``benchmarks/full_finetune_costs.py erank``.
    """
    D = delta if delta.shape[0] >= delta.shape[1] else delta.T  # G = D^T D is the smaller Gram matrix
    peak = D.abs().max() if D.numel() else 0
    if peak == 0:
        return 0.0
    D = D / peak  # the effective rank is scale-free; a tiny update would underflow in the Gram products
    n = D.shape[1]
    device = generator.device if generator is not None else torch.device("cpu")
    top = torch.zeros(0, dtype=torch.float64)
    if deflate > 0:
        ell = min(deflate, n)
        Y = D @ torch.randn(n, ell, generator=generator, device=device).to(D.device, D.dtype)
        for _ in range(power_iters):
            Y = D @ (D.T @ torch.linalg.qr(Y).Q)
        Qt = torch.linalg.qr(Y).Q
        top = torch.linalg.svdvals((Qt.T @ D).double()).cpu()
        D = D - Qt @ (Qt.T @ D)
        if ell == n:
            return effective_rank(top)
    s1, s2 = _slq_sums(D, probes, steps, generator)
    s1 += float(top.sum())
    s2 += float(torch.xlogy(top, top).sum())
    if s1 <= 0:
        return 0.0
    return s1 * math.exp(-s2 / s1)


def _slq_sums(D: Tensor, probes: int, steps: int, generator: torch.Generator | None) -> tuple[float, float]:
    """Stochastic Lanczos quadrature estimates of ``sum(sigma)`` and ``sum(sigma log sigma)`` of ``D``.

    The products with ``D`` (the cost) stay in its dtype; the Lanczos vectors, their reorthogonalization and the
    recurrence run in float64: in float32 they alone moved the estimate by up to 2e-4 (relative) between a matrix
    and its rescaled copy, by amounts that depend on the machine's BLAS kernels; mixed, by about 1e-5, at 1.8x the
    float32 time (all-float64: 4.6x; 4096 x 4096, 2 threads, 2026-12-03).
    """
    n = D.shape[1]
    steps = min(steps, n)
    device = generator.device if generator is not None else torch.device("cpu")
    signs = torch.randint(0, 2, (n, probes), generator=generator, device=device)
    q = (signs.to(D.device, torch.float64) * 2 - 1) / math.sqrt(n)
    Q = torch.empty(steps, n, probes, dtype=torch.float64, device=D.device)
    alpha = torch.zeros(steps, probes, dtype=torch.float64)
    beta = torch.zeros(steps, probes, dtype=torch.float64)
    for j in range(steps):
        Q[j] = q
        w = (D.T @ (D @ q.to(D.dtype))).double()
        alpha[j] = (q * w).sum(0).cpu()
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough")
            w = w - torch.einsum("jnp,jp->np", Q[: j + 1], torch.einsum("jnp,np->jp", Q[: j + 1], w))
        norms = w.norm(dim=0)
        beta[j] = norms.cpu()
        q = w / norms.clamp_min(torch.finfo(torch.float64).tiny)
    scale = max(float(alpha.abs().max()), 1e-300)
    s1 = s2 = 0.0
    for p in range(probes):
        # an invariant Krylov subspace (beta ~ 0) makes the rule exact at that size; later entries are noise
        small = (beta[:, p] <= 1e-6 * scale).nonzero()
        size = int(small[0]) + 1 if len(small) else steps
        T = torch.diag(alpha[:size, p]) + torch.diag(beta[: size - 1, p], 1) + torch.diag(beta[: size - 1, p], -1)
        theta, Y = torch.linalg.eigh(T)
        weight = Y[0] ** 2
        sigma = theta.clamp_min(0).sqrt()
        s1 += float((weight * sigma).sum())
        s2 += float((weight * torch.xlogy(sigma, sigma)).sum())
    return s1 * n / probes, s2 * n / probes  # Hutchinson: tr f(G) ~ mean of v^T f(G) v, with |v|^2 = n
