"""PEFT tuners other than LoRA, each checked against a float64 recount of PEFT's own ``merge_and_unload()``."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import reference_counts, tiny_bert, tiny_gpt2
from peft import get_peft_model
from test_peft_variants import ConvNet, plain_weights

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.discovery import find_lora_matrices, has_peft_layers
from lora_spectral_callback.metrics import effective_rank
from lora_spectral_callback.tuners import AdaLoraMatrix, LoHaMatrix, MergedMatrix, VeraMatrix

EPS = [0.5, 0.7]
QV = ["query", "value"]


def randomize(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Move every trainable parameter (PEFT inits most tuners to a zero update) so merges and counts are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def check_tuner(peft_model, base_model, kind: type, k: int = 10) -> dict[str, int]:
    """Counts, merged weights, top singular values and effective ranks against PEFT's ``merge_and_unload()`` run on a
    float64 copy of the model (so the recounted update carries no float32 merge rounding)."""
    monitor = SpectralMonitor(peft_model, epsilon=EPS, top_k=k, progress=False, strict=True, basis_dtype="float32")
    names = [m.name for m in monitor.matrices]
    assert names and all(type(m) is kind for m in monitor.matrices), [type(m) for m in monitor.matrices]
    report = monitor.measure(step=1)
    base = plain_weights(base_model, names)
    merged = plain_weights(copy.deepcopy(peft_model).double().merge_and_unload(), names)
    totals, per_layer = reference_counts(base, merged, EPS, k=k)
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {f"{e:g}": totals[e] for e in EPS}
    for matrix in monitor.matrices:
        W0 = matrix.base_weight().detach().double()
        torch.testing.assert_close(matrix.operator(W0).dense(), merged[matrix.name], rtol=1e-10, atol=1e-12)
        delta = torch.linalg.svdvals(merged[matrix.name] - base[matrix.name].double())
        layer = report.layers[matrix.name]
        assert layer.effective_rank == pytest.approx(effective_rank(delta.masked_fill(delta < 1e-12, 0)), rel=1e-6)
        S = torch.linalg.svdvals(merged[matrix.name])[:k]
        torch.testing.assert_close(torch.tensor(layer.singular_values, dtype=torch.float64), S, rtol=1e-4, atol=1e-5)
    return per_layer


LOW_RANK = {
    "adalora": (peft.AdaLoraConfig(init_r=6, target_r=4, target_modules=QV, total_step=10), AdaLoraMatrix),
    "vera": (peft.VeraConfig(r=8, target_modules=QV), VeraMatrix),
    "loha": (peft.LoHaConfig(r=4, alpha=8, target_modules=QV), LoHaMatrix),
}
DENSE = {
    "lokr": peft.LoKrConfig(r=4, alpha=8, target_modules=QV),
    "ia3": peft.IA3Config(
        target_modules=["query", "value", "intermediate.dense"], feedforward_modules=["intermediate.dense"]
    ),
    "oft": peft.OFTConfig(r=0, oft_block_size=16, target_modules=QV),
    "boft": peft.BOFTConfig(boft_block_size=8, target_modules=QV),
    "hra": peft.HRAConfig(r=4, target_modules=QV),
    "fourierft": peft.FourierFTConfig(n_frequency=100, target_modules=QV),
}


@pytest.mark.parametrize("tuner", list(LOW_RANK))
def test_low_rank_tuner_matches_merge_and_unload(tuner):
    config, kind = LOW_RANK[tuner]
    base = tiny_bert(hidden=64)
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    randomize(model, scale=0.5, seed=1)
    assert has_peft_layers(model)
    assert sum(check_tuner(model, base, kind).values()) > 0
    matrix = find_lora_matrices(model)[0][0]
    B, _ = matrix.update_factors(torch.float64, torch.device("cpu"))
    assert B.shape[1] == {"adalora": 6, "vera": 8, "loha": 16}[tuner]  # AdaLoRA r, VeRA r, LoHa r^2 (Khatri-Rao)


@pytest.mark.parametrize("tuner", list(DENSE))
def test_other_tuner_matches_merge_and_unload_through_the_dense_fallback(tuner):
    base = tiny_bert(hidden=64)
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(DENSE[tuner]))
    randomize(model, scale=0.3, seed=2)
    intruders = sum(check_tuner(model, base, MergedMatrix).values())
    # HRA multiplies W by Householder reflections on the input side, W H with H orthogonal: U does not move
    assert intruders == 0 if tuner == "hra" else intruders > 0


def test_vera_on_gpt2_conv1d_and_adalora_on_conv():
    base = tiny_gpt2(hidden=64)
    model = get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize(model, scale=0.5, seed=3)
    check_tuner(model, base, VeraMatrix)
    conv = ConvNet()
    model = get_peft_model(copy.deepcopy(conv), peft.AdaLoraConfig(init_r=4, target_modules=["conv2"], total_step=10))
    randomize(model, scale=0.5, seed=4)
    check_tuner(model, conv, AdaLoraMatrix)


@pytest.mark.parametrize("effective_conv2d", [False, True], ids=["khatri-rao", "cp-dense"])
def test_loha_and_lokr_on_convolutions(effective_conv2d):
    """LoHa on a conv is Khatri-Rao factors of the flattened kernel, unless its CP kernel (use_effective_conv2d) is
    used: that one, and LoKr, go through the dense fallback."""
    conv = ConvNet()
    targets = ["conv1", "conv2", "conv1d"]
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=targets, use_effective_conv2d=effective_conv2d)
    model = get_peft_model(copy.deepcopy(conv), config)
    randomize(model, scale=0.5, seed=5)
    assert sum(check_tuner(model, conv, MergedMatrix if effective_conv2d else LoHaMatrix).values()) > 0
    model = get_peft_model(copy.deepcopy(conv), peft.LoKrConfig(r=4, alpha=8, target_modules=targets))
    randomize(model, scale=0.5, seed=6)
    check_tuner(model, conv, MergedMatrix)


def test_capture_freezes_the_adapters_of_a_dense_fallback_layer():
    base = tiny_bert(hidden=64)
    model = get_peft_model(copy.deepcopy(base), peft.LoKrConfig(r=4, alpha=8, target_modules=QV))
    randomize(model, scale=0.3, seed=7)
    monitor = SpectralMonitor(model, progress=False, basis_dtype="float32")
    captured = monitor.capture()
    before = monitor.measure(step=0, matrices=captured)
    randomize(model, scale=0.3, seed=8)  # training moves on; the capture must not
    again = monitor.measure(step=0, matrices=captured)
    assert {n: r.singular_values for n, r in before.layers.items()} == {
        n: r.singular_values for n, r in again.layers.items()
    }
    assert monitor.measure(step=1).layers != again.layers
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert captured[0].state.get_base_layer().weight is layer.get_base_layer().weight  # frozen base shared, not copied
