"""The numerical core against float64 full SVDs: operator algebra, top-k triplets, intruder counts, effective rank."""

from __future__ import annotations

import math

import pytest
import torch

from lora_spectral_callback.linalg import (
    BASE_ROWS,
    LowRankUpdatedMatrix,
    exact_top_singular_triplets,
    top_singular_triplets,
)
from lora_spectral_callback.metrics import (
    basis_rounding_error,
    count_intruders,
    effective_rank,
    low_rank_singular_values,
    max_abs_cosine,
    pretrained_basis_and_spectrum,
)

EPSILONS = [0.3, 0.5, 0.7]


def spectrum_matrix(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """Random orthogonal factors around singular values i^-decay (decay 0.1: the flat spectra of real weights)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** (-decay)
    return (U * s) @ V.T


def lora_update(m: int, n: int, r: int, top: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rank-r factors scaled so that the update's top singular value is ``top``."""
    g = torch.Generator().manual_seed(seed + 1000)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    return B * (top / low_rank_singular_values(B, A)[0]), A


def reference(W0: torch.Tensor, W: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Alg. 1 verbatim in float64: max |cos| of the top-k merged vectors against all of U0; and sigma."""
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :k].T @ U0).abs().max(dim=1).values, S[:k]


def test_operator_products_match_dense():
    g = torch.Generator().manual_seed(0)
    W0, B, A = torch.randn(30, 20, generator=g), torch.randn(30, 3, generator=g), torch.randn(3, 20, generator=g)
    d = torch.rand(30, generator=g) + 0.5
    op = LowRankUpdatedMatrix(W0, B, A, d)
    dense = d[:, None] * (W0 + B @ A)
    X, Y = torch.randn(20, 4, generator=g), torch.randn(30, 4, generator=g)
    torch.testing.assert_close(op.dense(), dense)
    torch.testing.assert_close(op.matmul(X), dense @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.rmatmul(Y), dense.T @ Y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        LowRankUpdatedMatrix(W0, B, A[:, :5])


def test_base_product_of_a_tall_weight_is_taken_in_row_blocks_exactly():
    """On CPU ``W0 @ X`` goes a block of ``BASE_ROWS`` rows at a time (faster there); the blocks, the last one
    shorter, give the one product's values."""
    g = torch.Generator().manual_seed(0)
    m = 2 * BASE_ROWS + 37
    W0, X = torch.randn(m, 64, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    product = LowRankUpdatedMatrix(W0).base_matmul(X)
    assert product.shape == (m, 5)
    torch.testing.assert_close(product, W0 @ X, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "m,n,decay,top,seed",
    [
        (2048, 2048, 0.1, 1.0, 0),  # flat pretrained spectrum, update as large as the top singular values
        (2048, 2048, 0.1, 0.6, 1),  # flat, mixed: some top vectors intruders, some not
        (1024, 1024, 0.5, 1.0, 2),  # steep spectrum
        (1024, 1024, 0.1, 0.3, 3),  # small update: no intruders
        (1536, 768, 0.2, 0.8, 4),  # tall
        (600, 1400, 0.2, 0.8, 5),  # wide
    ],
)
def test_iterative_counts_equal_float64_full_svd(m, n, decay, top, seed):
    W0 = spectrum_matrix(m, n, decay, seed)
    B, A = lora_update(m, n, 8, top * W0.norm(p=2).item(), seed)
    ref_cos, ref_s = reference(W0, W0 + B @ A)
    assume_decidable = (ref_cos[:, None] - torch.tensor(EPSILONS)).abs().min() > 2e-3
    assert assume_decidable, "test case sits on a threshold; pick another seed"

    basis = pretrained_basis_and_spectrum(W0.float())[0].half()  # the monitor's defaults: fp32 snapshot, fp16 storage
    slack = basis_rounding_error(torch.float16)
    eps = torch.tensor(EPSILONS)

    def margin(U):
        return (max_abs_cosine(U, basis)[None] - eps[:, None]).abs().amin(0) - slack

    op = LowRankUpdatedMatrix(W0.float(), B.float(), A.float())
    svd = top_singular_triplets(op, 10, basis[:, :20].float(), needed_accuracy=margin)
    ours = max_abs_cosine(svd.U, basis)
    assert svd.converged
    assert count_intruders(ours, EPSILONS) == count_intruders(ref_cos, EPSILONS)
    assert (ours.double() - ref_cos).abs().max() < 1e-2  # reported cosines within tol
    torch.testing.assert_close(svd.S.double(), ref_s, rtol=1e-4, atol=0)
    assert (svd.error <= 1e-2).all()


def test_error_bound_holds_against_float64_vectors():
    W0 = spectrum_matrix(1024, 1024, 0.1, 7)
    B, A = lora_update(1024, 1024, 8, 0.8, 7)
    U_ref = torch.linalg.svd(W0 + B @ A, full_matrices=False)[0][:, :10]
    svd = top_singular_triplets(
        LowRankUpdatedMatrix(W0, B, A), 10, None, tol=1e-3, generator=torch.Generator().manual_seed(0)
    )
    signs = torch.sign((svd.U * U_ref).sum(0))
    actual = (svd.U - U_ref * signs).norm(dim=0)
    assert svd.converged and (actual <= svd.error + 1e-10).all()


def test_solver_uses_private_generator_only():
    op = LowRankUpdatedMatrix(torch.randn(300, 200, dtype=torch.float64))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = top_singular_triplets(op, 5, None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)  # the global RNG did not advance
    b = top_singular_triplets(op, 5, None, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.U, b.U)  # and a seeded generator makes the result reproducible


def test_exact_path_matches_lapack_and_keeps_dtype():
    W0 = spectrum_matrix(80, 50, 0.3, 9).float()
    svd = exact_top_singular_triplets(LowRankUpdatedMatrix(W0), 10)
    U, S, _ = torch.linalg.svd(W0.double())
    assert svd.U.dtype == torch.float32 and svd.converged and svd.iterations == 0
    torch.testing.assert_close(svd.S.double(), S[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        (svd.U.double() * U[:, :10]).sum(0).abs(), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-5
    )


def test_count_intruders_is_strict_and_multi_threshold():
    max_cos = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.95])
    assert count_intruders(max_cos, 0.5) == 2  # 0.5 itself is not below 0.5
    assert count_intruders(max_cos, EPSILONS) == {0.3: 1, 0.5: 2, 0.7: 3}


def test_max_abs_cosine_is_paper_definition_and_chunk_independent():
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
    U = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=torch.float64)).Q
    expected = (U.T @ U0).abs().max(dim=1).values
    torch.testing.assert_close(max_abs_cosine(U, U0, chunk=7), expected)
    torch.testing.assert_close(max_abs_cosine(U, U0[:, :50]), expected)
    # a float16 basis is widened chunk by chunk into one buffer (the last chunk shorter): each chunk's own values
    narrow = U0.half()
    widened = (U.float().T @ narrow.float()).abs().max(dim=1).values
    for chunk in (7, 16, 50, 64):
        torch.testing.assert_close(max_abs_cosine(U.float(), narrow, chunk=chunk), widened, rtol=1e-6, atol=1e-6)


def test_fp16_basis_moves_cosines_by_at_most_the_stated_bound():
    g = torch.Generator().manual_seed(1)
    U0 = torch.linalg.qr(torch.randn(512, 512, generator=g)).Q
    U = torch.linalg.qr(torch.randn(512, 10, generator=g)).Q
    exact = (U.double().T @ U0.double()).abs()
    rounded = (U.double().T @ U0.half().double()).abs()
    assert (exact - rounded).abs().max() <= basis_rounding_error(torch.float16)
    assert basis_rounding_error(torch.float16) == pytest.approx(4.88e-4, rel=1e-2)


def test_effective_rank_definition():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_low_rank_singular_values_are_exact():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(300, 6, generator=g), torch.randn(6, 200, generator=g)
    expected = torch.linalg.svdvals((B @ A).double())[:6]
    torch.testing.assert_close(low_rank_singular_values(B, A), expected, rtol=1e-5, atol=0)
    assert torch.equal(
        low_rank_singular_values(torch.zeros(10, 2), torch.randn(2, 5)), torch.zeros(2, dtype=torch.float64)
    )
    # an exact cancellation (a PiSSA adapter before training: [s B, -s B0] [A; A0] with B = B0) is zero, not noise
    assert torch.equal(low_rank_singular_values(torch.cat([B, -B], 1), torch.cat([A, A])), torch.zeros(12).double())


@pytest.mark.parametrize("decay", ["noise", "power", "rank8"])
def test_effective_rank_estimate_matches_float64_svd(decay):
    """Deflated stochastic Lanczos quadrature vs all singular values in float64, on three kinds of spectra; the
    estimate is deterministic given its generator and leaves the global RNG alone."""
    from lora_spectral_callback.metrics import effective_rank, estimate_effective_rank

    g = torch.Generator().manual_seed(0)
    m, n = 600, 400
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    i = torch.arange(1, n + 1, dtype=torch.float64)
    sigma = {
        "noise": torch.linalg.svdvals(torch.randn(m, n, generator=g, dtype=torch.float64)),
        "power": 1 / i,
        "rank8": (i <= 8).double(),
    }[decay]
    delta = (U * sigma) @ V.T
    exact = effective_rank(torch.linalg.svdvals(delta))
    state = torch.random.get_rng_state()
    first = estimate_effective_rank(delta.float(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.random.get_rng_state())
    assert first == estimate_effective_rank(delta.float(), generator=torch.Generator().manual_seed(3))
    assert first == pytest.approx(exact, rel=0.02)
    assert estimate_effective_rank(delta.T.float(), generator=torch.Generator().manual_seed(3)) == pytest.approx(
        exact, rel=0.02
    )
    tiny = delta.float() * 1e-25  # scale-free: a tiny update must not underflow in the Gram products
    assert estimate_effective_rank(tiny, generator=torch.Generator().manual_seed(3)) == pytest.approx(first, rel=1e-4)
    assert estimate_effective_rank(torch.zeros(50, 40)) == 0.0


def _solve(op, basis, start, **options):
    """The solver as the monitor runs it (fp16-stored basis, margins at EPSILONS), returning (svd, max_cos)."""
    slack = basis_rounding_error(basis.dtype)
    eps = torch.tensor(EPSILONS, dtype=op.W0.dtype)

    def margin(U):
        return (max_abs_cosine(U, basis)[None] - eps[:, None]).abs().amin(0) - slack

    svd = top_singular_triplets(op, 10, start, needed_accuracy=margin, **options)
    return svd, max_abs_cosine(svd.U, basis)


def _assert_matches_float64(svd, max_cos, W0, W):
    ref_cos, ref_s = reference(W0, W)
    assert (ref_cos[:, None] - torch.tensor(EPSILONS, dtype=torch.float64)).abs().min() > 2e-3, "pick another seed"
    U_ref = torch.linalg.svd(W, full_matrices=False)[0][:, :10]
    actual = (svd.U.double() - U_ref * torch.sign((svd.U.double() * U_ref).sum(0))).norm(dim=0)
    assert svd.converged
    assert count_intruders(max_cos, EPSILONS) == count_intruders(ref_cos, EPSILONS)
    assert (actual <= svd.error.double() + 1e-6).all()  # the bound holds (fp32 solve against float64 vectors)
    torch.testing.assert_close(svd.S.double(), ref_s, rtol=1e-4, atol=0)


@pytest.mark.parametrize("m,n,decay", [(1024, 1024, 0.1), (1024, 1024, 0.5), (1536, 768, 0.2), (600, 1400, 0.2)])
def test_warm_start_after_drift_reuses_products_and_stays_exact(m, n, decay):
    """A measurement, then B drifted by 5% of its norm (~50 training steps) and A by 2%: the second solve starts from
    the first one's KrylovSpace, reusing its W0 products, and still agrees with float64 LAPACK."""
    W0 = spectrum_matrix(m, n, decay, 11)
    B, A = lora_update(m, n, 8, 0.8 * W0.norm(p=2).item(), 11)
    g = torch.Generator().manual_seed(12)
    B2 = B + 0.05 * B.norm() * (G := torch.randn(B.shape, generator=g, dtype=torch.float64)) / G.norm()
    A2 = A + 0.02 * A.norm() * (H := torch.randn(A.shape, generator=g, dtype=torch.float64)) / H.norm()
    basis = pretrained_basis_and_spectrum(W0.float())[0].half()
    first, _ = _solve(LowRankUpdatedMatrix(W0.float(), B.float(), A.float()), basis, basis[:, :20].float())
    assert first.block.W0tQ is not None and first.block.checksum is not None
    torch.testing.assert_close(first.block.W0tQ, W0.float().T @ first.block.Q, rtol=0, atol=1e-4)
    svd, max_cos = _solve(LowRankUpdatedMatrix(W0.float(), B2.float(), A2.float()), basis, first.block)
    _assert_matches_float64(svd, max_cos, W0, W0 + B2 @ A2)


def test_stale_krylov_space_is_only_a_start_block():
    """A KrylovSpace whose W0 has changed since (full fine-tuning, a merged adapter) must not lend its products."""
    W0 = spectrum_matrix(800, 800, 0.2, 13)
    B, A = lora_update(800, 800, 8, 0.8 * W0.norm(p=2).item(), 13)
    basis = pretrained_basis_and_spectrum(W0.float())[0].half()
    first, _ = _solve(LowRankUpdatedMatrix(W0.float(), B.float(), A.float()), basis, basis[:, :20].float())
    W1 = W0 + 0.3 * spectrum_matrix(800, 800, 0.2, 14)  # the "pretrained" part moved
    svd, max_cos = _solve(LowRankUpdatedMatrix(W1.float(), B.float(), A.float()), basis, first.block)
    ref_cos = (torch.linalg.svd(W1 + B @ A)[0][:, :10].T @ basis.double()).abs().amax(1)
    assert svd.converged
    assert count_intruders(max_cos, EPSILONS) == count_intruders(ref_cos, EPSILONS)
    assert ((max_cos.double() - ref_cos).abs() <= svd.error.double() + 1e-6).all()


def test_row_scaled_operator_and_thick_restart_agree_with_float64():
    """DoRA's row scale (products not split, no reusable W0 products) with a tiny max_block forcing thick restarts."""
    W0 = spectrum_matrix(900, 700, 0.1, 15)
    B, A = lora_update(900, 700, 8, 0.7 * W0.norm(p=2).item(), 15)
    d = torch.rand(900, generator=torch.Generator().manual_seed(15), dtype=torch.float64) + 0.5
    basis = pretrained_basis_and_spectrum(W0.float())[0].half()
    op = LowRankUpdatedMatrix(W0.float(), B.float(), A.float(), d.float())
    svd, max_cos = _solve(op, basis, basis[:, :20].float(), max_block=40)
    assert svd.block.W0tQ is None
    _assert_matches_float64(svd, max_cos, W0, d[:, None] * (W0 + B @ A))


def test_space_reaching_the_smaller_dimension_falls_back_to_dense_svd():
    W0 = spectrum_matrix(400, 60, 0.05, 16)
    B, A = lora_update(400, 60, 4, 0.5 * W0.norm(p=2).item(), 16)
    svd = top_singular_triplets(LowRankUpdatedMatrix(W0, B, A), 10, None, tol=1e-12, max_iter=50)
    S_ref = torch.linalg.svdvals(W0 + B @ A)
    assert svd.converged and (svd.error == 0).all()
    torch.testing.assert_close(svd.S, S_ref[:10], rtol=1e-10, atol=0)


def test_all_finite_is_exact():
    from lora_spectral_callback.metrics import all_finite

    x = torch.randn(300, 200)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 3] = bad
        assert not all_finite(y)
    huge = torch.full((4, 4), 3e38)  # finite entries whose sum overflows: the elementwise check decides
    assert all_finite(huge) and not all_finite(torch.cat([huge.flatten(), torch.tensor([float("nan")])]))
