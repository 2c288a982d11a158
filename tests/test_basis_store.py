"""Disk (memory-mapped) and cached pretrained bases give the same reports as in-memory ones, computed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_bert
from peft import LoraConfig, get_peft_model

from lora_spectral_callback import SpectralMonitor, basis_store
from lora_spectral_callback.basis_store import BasisStore, weight_fingerprint
from lora_spectral_callback.metrics import pretrained_basis_and_spectrum


def lora_bert(seed: int = 0):
    """Tiny BERT with random (non-zero) LoRA factors, so the merged weights have intruders to find."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(tiny_bert(), config)


def reports_equal(a, b) -> None:
    assert a.intruders_total_by_epsilon == b.intruders_total_by_epsilon
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        assert la.intruders_by_epsilon == lb.intruders_by_epsilon
        # same fp16 values; only BLAS summation order may differ with the buffer's alignment
        torch.testing.assert_close(torch.tensor(la.max_cos), torch.tensor(lb.max_cos), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            torch.tensor(la.singular_values), torch.tensor(lb.singular_values), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("exact_below", [512, 0])  # exact SVD path and iterative solver path
def test_disk_and_cached_bases_give_identical_reports(tmp_path, exact_below):
    model = lora_bert()
    options = dict(epsilon=[0.3, 0.5, 0.7], exact_below=exact_below, progress=False)
    memory = SpectralMonitor(model, **options).measure(1)
    disk = SpectralMonitor(model, basis_device="disk", **options)
    cached = SpectralMonitor(model, basis_cache_dir=str(tmp_path), **options)
    reports_equal(memory, disk.measure(1))
    reports_equal(memory, cached.measure(1))
    assert disk.basis_bytes() == 0
    assert memory.intruders_total_by_epsilon["0.7"] > 0  # the comparison is not vacuous


def test_cache_hit_on_second_monitor_runs_no_svd(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        basis_store,
        "pretrained_basis_and_spectrum",
        lambda W, dtype, method: calls.append(1) or pretrained_basis_and_spectrum(W, dtype, method),
    )
    model = lora_bert()
    first = SpectralMonitor(model, basis_cache_dir=str(tmp_path), basis_device="disk", progress=False)
    first.snapshot()
    n_layers = len(first.matrices)
    assert len(calls) == first.snapshots.store.computed == n_layers
    assert len(list(tmp_path.glob("*.safetensors"))) == n_layers
    second = SpectralMonitor(model, basis_cache_dir=str(tmp_path), progress=False)  # in-memory, same cache
    second.snapshot()
    assert len(calls) == n_layers and second.snapshots.store.computed == 0
    for name, state in first.snapshots.layers.items():
        assert torch.equal(state.basis, second.snapshots.layers[name].basis)


def test_memory_map_reads_nothing_up_front(tmp_path):
    W0 = torch.randn(48, 32)
    store = BasisStore(torch.float16, "disk", str(tmp_path))
    U0, S = store.basis(W0)
    assert isinstance(U0.numpy(), np.memmap) or U0.untyped_storage().nbytes() == U0.numel() * 2
    torch.testing.assert_close(U0.float(), pretrained_basis_and_spectrum(W0)[0].half().float())
    torch.testing.assert_close(S, torch.linalg.svdvals(W0.double()), rtol=1e-5, atol=1e-6)  # kept for pictures


def test_cache_file_without_a_spectrum_is_recomputed(tmp_path):
    """Cache files written before spectra were kept hold only the basis: they count as a miss and are rewritten."""
    W0 = torch.randn(40, 24)
    first = BasisStore(torch.float16, "cpu", str(tmp_path))
    first.basis(W0)
    (path,) = tmp_path.glob("*.safetensors")
    basis_store._save_atomically({"basis": pretrained_basis_and_spectrum(W0)[0].half()}, str(path))  # the old format
    second = BasisStore(torch.float16, "cpu", str(tmp_path))
    _, S = second.basis(W0)
    assert second.computed == 1 and S.shape == (24,)
    third = BasisStore(torch.float16, "cpu", str(tmp_path))
    third.basis(W0)
    assert third.computed == 0


def test_fingerprint_depends_on_values_shape_and_dtype():
    W = torch.arange(12.0).reshape(3, 4)
    assert weight_fingerprint(W) == weight_fingerprint(W.clone())
    assert weight_fingerprint(W) != weight_fingerprint(W.reshape(4, 3))
    assert weight_fingerprint(W) != weight_fingerprint(W.double())
    W2 = W.clone()
    W2[0, 0] += 1e-6
    assert weight_fingerprint(W) != weight_fingerprint(W2)


def test_bad_basis_device_fails_at_construction():
    with pytest.raises(ValueError, match="basis_device"):
        SpectralMonitor(lora_bert(), basis_device="floppy")
