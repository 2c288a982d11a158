"""Property-based tests (hypothesis) of the numerical core: ``linalg`` and ``metrics`` on random problems
``M = W0 + B A`` of random shapes (tall, wide, square), update ranks and scales, with rank-deficient ``W0``.

Ill-posed cases are assumed away, because there the answer is not defined and any output is right:
- ties among the top k+1 singular values of ``M`` (relative gap < 1e-3): the individual top-k left singular
  vectors, and at the k boundary the set of them, are then arbitrary;
- a top-k singular value that is (numerically) zero: its vector is any vector of the null space;
- a reference max|cos| within 1e-3 of some epsilon: the count flips under rounding;
- for the invariance tests only, a ``W0`` with tied or zero singular values: its thin left basis (which the paper
  compares against column by column) is then arbitrary within an eigenspace, so rotating the problem may
  legitimately change max|cos|. Rank-deficient ``W0`` is still tested for agreement with the float64 full SVD
  and for the count properties, which use the same deterministic basis on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lora_spectral_callback.linalg import LowRankUpdatedMatrix, exact_top_singular_triplets, top_singular_triplets
from lora_spectral_callback.metrics import count_intruders, max_abs_cosine, pretrained_basis_and_spectrum

GAP = 1e-3  # relative singular-value gap / distance to epsilon below which a case is ill-posed
PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@dataclass
class Problem:
    W0: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    k: int
    epsilons: list[float]

    def merged(self) -> torch.Tensor:
        return self.W0 + self.B @ self.A


@st.composite
def problems(draw, full_rank: bool = False) -> Problem:
    m, n = draw(st.integers(2, 32)), draw(st.integers(2, 32))
    rank = min(m, n) if full_rank else draw(st.integers(1, min(m, n)))
    r = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    W0 = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    scale = draw(st.sampled_from([0.01, 0.3, 1.0, 3.0]))  # from a gentle nudge to an update that dominates
    B = scale * torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    k = draw(st.integers(1, min(m, n)))
    epsilons = sorted(draw(st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3, unique=True)))
    return Problem(W0, B, A, k, epsilons)


def reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Alg. 1 with float64 full SVDs: (max|cos| of the top-k, top-k singular values)."""
    U0 = torch.linalg.svd(p.W0, full_matrices=False)[0]
    U, S, _ = torch.linalg.svd(p.merged(), full_matrices=False)
    return max_abs_cosine(U[:, : p.k], U0), S[: p.k]


def assume_well_posed(p: Problem, basis_too: bool = False) -> None:
    S = torch.linalg.svdvals(p.merged())
    top = S[: p.k + 1]
    assume(bool(top[p.k - 1] > GAP * S[0]))
    assume(top.numel() < 2 or bool(((top[:-1] - top[1:]) > GAP * S[0]).all()))
    max_cos, _ = reference(p)
    assume(all(bool(((max_cos - e).abs() > GAP).all()) for e in p.epsilons))
    if basis_too:
        S0 = torch.linalg.svdvals(p.W0)
        assume(bool(S0[-1] > GAP * S0[0]) and bool(((S0[:-1] - S0[1:]) > GAP * S0[0]).all()))


def against_reference(p: Problem, solve) -> tuple:
    """On a well-posed ``p``: ``solve(p)``'s (max|cos|, svd) beside the float64 reference's (max|cos|, singular
    values)."""
    assume_well_posed(p)
    return *solve(p), *reference(p)


def exact(p: Problem):
    basis = pretrained_basis_and_spectrum(p.W0, torch.float64, "svd")[0]  # the reference's own basis
    svd = exact_top_singular_triplets(LowRankUpdatedMatrix(p.W0, p.B, p.A), p.k)
    return max_abs_cosine(svd.U, basis), svd


def iterative(p: Problem, oversample: int = 2):
    """The warm-started subspace iteration as the monitor runs it (seeded by the pretrained basis, stopped once
    every count is certain), with a small block so that it really iterates on these small matrices."""
    basis = pretrained_basis_and_spectrum(p.W0, torch.float64, "svd")[0]  # the reference's own basis
    epsilons = torch.tensor(p.epsilons, dtype=torch.float64)

    def margin(U):
        return (max_abs_cosine(U, basis)[None, :] - epsilons[:, None]).abs().amin(dim=0)

    svd = top_singular_triplets(
        LowRankUpdatedMatrix(p.W0, p.B, p.A),
        p.k,
        basis[:, : p.k + oversample],
        oversample=oversample,
        tol=1e-8,
        max_iter=2000,
        needed_accuracy=margin,
        generator=torch.Generator().manual_seed(0),
    )
    return max_abs_cosine(svd.U, basis), svd


def rotated(p: Problem, seed: int) -> Problem:
    """The whole problem in other orthonormal coordinates: W0 -> Q W0 R, B -> Q B, A -> A R."""
    g = torch.Generator().manual_seed(seed)
    m, n = p.W0.shape
    Q = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return Problem(Q @ p.W0 @ R, Q @ p.B, p.A @ R, p.k, p.epsilons)


# -- agreement with the float64 full SVD (both paths, any rank) -------------------------------------------------
@PROPERTIES
@given(problems())
def test_exact_path_agrees_with_full_svd(p):
    max_cos, svd, ref_cos, ref_S = against_reference(p, exact)
    assert torch.allclose(max_cos, ref_cos, atol=1e-9)
    assert torch.allclose(svd.S, ref_S, rtol=1e-10, atol=1e-12 * float(ref_S[0]))
    assert count_intruders(max_cos, p.epsilons) == count_intruders(ref_cos, p.epsilons)


@PROPERTIES
@given(problems())
def test_iterative_path_agrees_with_full_svd_within_its_error_bound(p):
    max_cos, svd, ref_cos, ref_S = against_reference(p, iterative)
    # The a-posteriori bound on each vector bounds the error of its cosine: the solver's own contract.
    assert bool(((max_cos - ref_cos).abs() <= svd.error + 1e-9).all())
    # A count is certain once its cosine is farther from every epsilon than the bound; then it is exact.
    epsilons = torch.tensor(p.epsilons, dtype=torch.float64)
    certain = ((max_cos[None, :] - epsilons[:, None]).abs() > svd.error).all(dim=0)
    for e in p.epsilons:
        assert bool(((max_cos < e) == (ref_cos < e))[certain].all())
    if svd.converged:
        assert bool(certain.all())
        assert count_intruders(max_cos, p.epsilons) == count_intruders(ref_cos, p.epsilons)
        assert torch.allclose(svd.S, ref_S, rtol=1e-6)


# -- counts ------------------------------------------------------------------------------------------------------
@PROPERTIES
@given(problems(), st.booleans())
def test_counts_in_range_and_monotone_in_epsilon(p, use_iterative):
    max_cos, _svd = iterative(p) if use_iterative else exact(p)
    k = min(p.k, *p.W0.shape)
    grid = [i / 20 for i in range(1, 20)]
    counts = count_intruders(max_cos, grid)
    assert all(0 <= counts[e] <= k for e in grid)
    assert [counts[e] for e in grid] == sorted(counts[e] for e in grid)  # more intruders as epsilon grows


# -- invariances (full-rank W0 with distinct singular values) -----------------------------------------------------
@PROPERTIES
@given(problems(full_rank=True), st.integers(0, 2**31 - 1), st.booleans())
def test_invariant_under_orthogonal_rotation_of_the_whole_problem(p, seed, use_iterative):
    assume_well_posed(p, basis_too=True)
    q = rotated(p, seed)
    measure = iterative if use_iterative else exact
    (cos_p, svd_p), (cos_q, svd_q) = measure(p), measure(q)
    assert torch.allclose(cos_p, cos_q, atol=1e-7 + float((svd_p.error + svd_q.error).max()))
    assert torch.allclose(svd_p.S, svd_q.S, rtol=1e-7)
    assert count_intruders(cos_p, p.epsilons) == count_intruders(cos_q, p.epsilons)


@PROPERTIES
@given(problems(full_rank=True), st.sampled_from([1e-3, 0.5, 7.0, 1e3]), st.booleans())
def test_invariant_under_positive_scaling(p, c, use_iterative):
    assume_well_posed(p, basis_too=True)
    q = Problem(c * p.W0, c * p.B, p.A, p.k, p.epsilons)  # M -> c M
    measure = iterative if use_iterative else exact
    (cos_p, svd_p), (cos_q, svd_q) = measure(p), measure(q)
    assert torch.allclose(cos_p, cos_q, atol=1e-7 + float((svd_p.error + svd_q.error).max()))
    assert torch.allclose(c * svd_p.S, svd_q.S, rtol=1e-7)
    assert count_intruders(cos_p, p.epsilons) == count_intruders(cos_q, p.epsilons)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)], ids=["tall", "wide", "square"])
def test_shapes_reach_the_iterative_path_and_stay_orthonormal(shape):
    """A fixed-seed sanity check that the generated shapes exercise the solver for real (several iterations)."""
    g = torch.Generator().manual_seed(1)
    m, n = shape
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    p = Problem(
        W0,
        torch.randn(m, 2, generator=g, dtype=torch.float64),
        torch.randn(2, n, generator=g, dtype=torch.float64),
        3,
        [0.5],
    )
    max_cos, svd = iterative(p, oversample=1)
    assert svd.converged and svd.iterations >= 2
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(max_cos, reference(p)[0], atol=float(svd.error.max()) + 1e-9)


# -- the snapshot ------------------------------------------------------------------------------------------------
@PROPERTIES
@given(problems())
def test_gram_snapshot_is_the_thin_svd_basis(p):
    """The default snapshot (float64 eigendecomposition of the smaller Gram matrix) against LAPACK's thin SVD, on
    tall, wide and rank-deficient weights: all min(m, n) columns, orthonormal (null space included), the same
    singular values, and the same vector wherever LAPACK's is determined (singular value well separated)."""
    U, S = pretrained_basis_and_spectrum(p.W0, torch.float64, "gram")
    U_ref, S_ref, _ = torch.linalg.svd(p.W0, full_matrices=False)
    top = float(S_ref[0])
    assert U.shape == U_ref.shape
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(S, S_ref, rtol=0, atol=1e-7 * top)
    others = (S_ref[:, None] - S_ref[None, :]).abs() + torch.eye(S.numel(), dtype=torch.float64) * top
    determined = (S_ref > GAP * top) & (others.min(dim=1).values > GAP * top)
    assert bool(((U * U_ref).sum(0).abs()[determined] > 1 - 1e-8).all())
