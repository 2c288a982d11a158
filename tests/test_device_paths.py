"""What the CUDA path adds, exercised on CPU with fakes: a basis is published only after the work producing it has
completed (pending until then), the snapshot method chosen by the device's float64 speed, and the solver's small
decompositions kept on LAPACK."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import reference_counts
from test_background_snapshot import weights
from training import lora_bert

from lora_spectral_callback import SpectralMonitor, basis_store, linalg
from lora_spectral_callback.basis_store import BasisStore, settle
from lora_spectral_callback.linalg import LowRankUpdatedMatrix, top_singular_triplets
from lora_spectral_callback.metrics import (
    basis_rounding_error,
    count_intruders,
    max_abs_cosine,
    pretrained_basis_and_spectrum,
)

EPS = [0.5, 0.7]


def test_settle_waits_for_the_current_cuda_stream_only(monkeypatch):
    synchronized = []

    class FakeStream:
        def __init__(self, device):
            self.device = device

        def synchronize(self):
            synchronized.append(self.device)

    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    settle(torch.device("cpu"))
    assert synchronized == []
    settle(torch.device("cuda", 1))
    assert synchronized == [torch.device("cuda", 1)]


def test_a_layer_stays_pending_until_its_basis_has_settled(monkeypatch):
    """The background snapshot's copies are held "in flight" (settle blocks on the worker thread): the bases are
    computed, yet no layer is measured before they settle; then every count equals a float64 recount."""
    release, reached = threading.Event(), threading.Event()

    def in_flight(device):
        if threading.current_thread() is not threading.main_thread():
            reached.set()
            assert release.wait(timeout=120), "the test never released the copy"

    monkeypatch.setattr(basis_store, "settle", in_flight)
    model = lora_bert(random_update=True)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True)
    monitor.snapshot(wait=False)
    assert reached.wait(timeout=120) and monitor.snapshots.store.computed >= 1  # a basis computed, its copy not settled
    waiting = monitor.measure(0)
    assert waiting.layers == {} and waiting.pending == [m.name for m in monitor.matrices]
    release.set()
    monitor.snapshot()
    done = monitor.measure(1)
    _, per_layer = reference_counts(*weights(model), EPS)
    assert done.pending == [] and {n: r.intruders for n, r in done.layers.items()} == per_layer


@pytest.mark.parametrize(
    "capability, dtype, method",
    [
        ((9, 0), torch.float16, "gram"),  # H100/H200: float64 is fast
        ((8, 0), torch.float16, "gram"),  # A100
        ((8, 9), torch.float16, "svd"),  # L4/L40S: float64 at 1/64
        ((8, 6), torch.bfloat16, "svd"),  # A10, RTX 30xx
        ((8, 9), torch.float32, "gram"),  # a 32-bit basis asks for precision
    ],
)
def test_snapshot_method_by_device(monkeypatch, capability, dtype, method):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    store = BasisStore(dtype)
    assert store.method_for(torch.device("cuda")) == method
    assert store.method_for(torch.device("cpu")) == "gram"
    assert BasisStore(dtype, method="svd").method_for(torch.device("cpu")) == "svd"


def test_float32_svd_basis_moves_cosines_far_less_than_float16_storage():
    """The accuracy check of bench_snapshot.py, small: the float32 SVD's cosines against a float64 basis."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(384, 384, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    W0 = (U[:, :256] * torch.arange(1, 257, dtype=torch.float64) ** -0.3) @ V.T
    tilted = U[:, :8] * torch.linspace(0.9, 0, 8, dtype=torch.float64) + torch.randn(384, 8, generator=g) / 40
    merged = W0 + torch.linalg.qr(tilted).Q @ torch.randn(8, 256, generator=g, dtype=torch.float64) / 8
    top = torch.linalg.svd(merged, full_matrices=False)[0][:, :10]
    exact = max_abs_cosine(top, torch.linalg.svd(W0, full_matrices=False)[0])
    fp32 = max_abs_cosine(top, pretrained_basis_and_spectrum(W0.float(), torch.float32, "svd")[0].double())
    assert float((fp32 - exact).abs().max()) < basis_rounding_error(torch.float16) / 20
    assert count_intruders(fp32, EPS) == count_intruders(exact, EPS)


def flat_low_rank_updated(n: int, seed: int = 0, device: str = "cpu") -> LowRankUpdatedMatrix:
    """A flat spectrum (1 down to 0.5, like a pretrained weight's) plus a rank-16 update."""
    g = torch.Generator().manual_seed(seed)
    U0, V0 = (torch.linalg.qr(torch.randn(n, n, generator=g)).Q for _ in range(2))
    W0 = (U0 * torch.linspace(1, 0.5, n)) @ V0.T
    B, A = torch.randn(n, 16, generator=g) * 0.05, torch.randn(16, n, generator=g) / n**0.5
    return LowRankUpdatedMatrix(*(t.to(device) for t in (W0, B, A)))


def test_the_solvers_small_decompositions_go_through_lapack(monkeypatch):
    """On CUDA, PyTorch's float32 eigh of 32-512 columns is cuSOLVER's Jacobi ``syevj``: on an H200 its
    eigenvectors of a Rayleigh-Ritz Gram matrix were orthogonal to 9e-5 (LAPACK: 1e-6), and the error bound of a
    4096² solve never settled (100 steps; ``benchmarks/gpu_check.py``). So every small decomposition of the solver
    goes through ``lapack.on_cpu``; eigenvectors orthogonal to only ~3e-4 (emulated, three times looser than
    syevj's there) stall it on this matrix."""
    M = flat_low_rank_updated(1024)
    start = torch.linalg.qr(torch.randn(1024, 20, generator=torch.Generator().manual_seed(1))).Q
    lapack, routed = linalg.on_cpu, set()

    def counted(decomposition, A):
        routed.add(decomposition)
        return lapack(decomposition, A)

    monkeypatch.setattr(linalg, "on_cpu", counted)
    good = top_singular_triplets(M, 10, start)
    assert routed == {torch.linalg.eigh, torch.linalg.eigvalsh, torch.linalg.svd}
    assert good.converged and good.iterations <= 4

    g = torch.Generator().manual_seed(2)

    def loose_eigh(decomposition, A):
        out = lapack(decomposition, A)
        if decomposition is not torch.linalg.eigh:
            return out
        theta, Y = out
        loose = Y + Y @ (torch.randn(Y.shape, generator=g) * 5e-4 / Y.shape[0] ** 0.5)
        orthogonality.append(float((loose.T @ loose - torch.eye(Y.shape[0])).abs().max()))
        return theta, loose

    orthogonality: list[float] = []
    monkeypatch.setattr(linalg, "on_cpu", loose_eigh)
    assert not top_singular_triplets(M, 10, start).converged
    assert max(orthogonality) < 4e-4
