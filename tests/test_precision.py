"""The solver's guarantee under TF32 (emulated on CPU: a product whose inputs are cut to 11 significant bits), and
the host syncs it needs per iteration."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import reference_counts, tiny_bert
from peft import LoraConfig, get_peft_model
from test_callback import weights_by_name
from test_layers import randomize_lora

from lora_spectral_callback import SpectralMonitor, products
from lora_spectral_callback.linalg import LowRankUpdatedMatrix, top_singular_triplets


def cut(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` with its significand cut to ``bits`` bits (towards zero: the worse of the conversions hardware does),
    written with frexp, independently of products.py."""
    mantissa, exponent = torch.frexp(x.double())
    return torch.ldexp(torch.trunc(mantissa * 2.0**bits) / 2.0**bits, exponent).to(x.dtype)


def tf32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A TF32 tensor-core product: inputs cut to 11 significant bits, products exact, sums in float32 (here even
    exact, then rounded once: the rounding under test is the inputs')."""
    if a.dtype != torch.float32:
        return a @ b
    return (cut(a, 11).double() @ cut(b, 11).double()).float()


@pytest.fixture
def tf32_on(monkeypatch):
    """float32 products reduced to TF32 on this CPU, as ``allow_tf32`` makes them on a GPU."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    monkeypatch.setattr(products, "_mm", tf32_product)
    yield
    torch.backends.mkldnn.matmul.fp32_precision = previous


def test_flags_are_read_from_every_api():
    cuda = torch.device("cuda")  # a device object: no GPU needed to read its flags
    previous = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert products.reduced_bits(cuda) == 11 and products.split_rounding(cuda, torch.float32) == 2.0**-18
        assert products.split_rounding(cuda, torch.float64) == 0.0
        torch.set_float32_matmul_precision("highest")
        assert products.reduced_bits(cuda) is None and products.reduced_bits(torch.device("cpu")) is None
        torch.set_float32_matmul_precision("medium")
        assert products.reduced_bits(torch.device("cpu")) == 8
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("bits, parts", [(11, 2), (8, 3)], ids=["tf32", "bf16"])
def test_split_parts_sum_to_x_and_all_but_the_last_fit_the_reduced_format(bits, parts):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 4096)
    pieces = products._split(x, bits, parts)
    assert torch.equal(sum(p.double() for p in pieces), x.double())
    for piece in pieces[:-1]:
        assert torch.equal(cut(piece, bits), piece)


def test_split_product_keeps_float32_accuracy_under_tf32(tf32_on):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 2048, generator=g), torch.randn(2048, 48, generator=g)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()  # sum |a_k b_k|: the per-term bound's unit
    plain = ((tf32_product(a, b).double() - exact).abs() / scale).max()
    split = ((products.matmul(a, b).double() - exact).abs() / scale).max()
    assert plain > 2.0**-13  # the fake has teeth: TF32 inputs are off by ~2^-11
    assert split <= 2.0**-18 + 2048 * 2.0**-24  # the documented per-term bound plus float32's accumulation


def test_error_bound_holds_under_tf32(tf32_on):
    g = torch.Generator().manual_seed(2)
    m, n, r = 300, 200, 6
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    W0 = (U[:, :n] * torch.arange(1, n + 1, dtype=torch.float64) ** -0.3) @ V.T
    B = torch.randn(m, r, generator=g, dtype=torch.float64) / m**0.5
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5
    op = LowRankUpdatedMatrix(W0.float(), B.float(), A.float())
    svd = top_singular_triplets(op, 10, tol=1e-2, generator=torch.Generator().manual_seed(0))
    exact = op.W0.double() + op.B.double() @ op.A.double()  # the float32 operator, in exact arithmetic
    true = torch.linalg.svd(exact, full_matrices=False)[0][:, :10]
    signs = torch.sign((true * svd.U.double()).sum(0))
    distance = torch.linalg.vector_norm(svd.U.double() * signs - true, dim=0)
    assert svd.converged and bool((distance <= svd.error.double()).all())
    floor = 8 * m**0.5 * (2.0**-23 + 2.0**-18)  # the allowance a TF32 solve charges: what it can promise at best
    assert bool((svd.error >= floor).all()) and float(svd.error.max()) < 1e-2


def test_counts_equal_float64_recount_under_tf32(tf32_on):
    model = get_peft_model(tiny_bert(hidden=64), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    randomize_lora(model, scale=0.3, seed=3)
    report = SpectralMonitor(model, epsilon=[0.5, 0.7], exact_below=0, progress=False, strict=True).measure(0)
    base, merged = weights_by_name(model)
    totals, per_layer = reference_counts(base, merged, [0.5, 0.7])
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {"0.5": totals[0.5], "0.7": totals[0.7]}


@contextlib.contextmanager
def host_syncs(monkeypatch):
    """Counts what makes a GPU wait for the host: tensor-to-Python conversions, boolean-mask indexing (a data-
    dependent size) and the LAPACK-style calls whose error check reads a device flag."""
    count = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    for name in ("eigh", "eigvalsh", "svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, counted(getattr(torch.linalg, name)))
    monkeypatch.setattr(torch, "unique", counted(torch.unique))
    matrix_norm = torch.linalg.matrix_norm

    def spectral_norm(A, ord="fro", *args, **kwargs):  # ord=2 is an SVD
        count[0] += ord == 2
        return matrix_norm(A, ord, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "matrix_norm", spectral_norm)
    getitem = torch.Tensor.__getitem__

    def indexing(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            count[0] += 1
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", indexing)
    yield count


def test_host_syncs_per_solver_iteration(monkeypatch):
    """Per step: the Rayleigh-Ritz eigh, the bound's eigvalsh, the one fetch of the worst unsettled bound, and the
    SVD and kept-block size of the new directions (5; one more fetch on the step that checks the margin)."""
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(400, 300, generator=g) * torch.arange(1, 301) ** -0.2
    op = LowRankUpdatedMatrix(W0, torch.randn(400, 4, generator=g) / 4, torch.randn(4, 300, generator=g))
    with host_syncs(monkeypatch) as count:
        svd = top_singular_triplets(
            op, 10, tol=1e-5, needed_accuracy=lambda U: torch.zeros(U.shape[1]), generator=torch.Generator()
        )
    assert svd.iterations >= 3
    # per solve: the W0 checksum, the start block's SVD and kept-block size; the last step computes no new block
    assert count[0] <= 3 + 5 * (svd.iterations - 1) + 4
