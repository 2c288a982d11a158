"""The model adapter: merged weights equal PEFT's own merge, counts equal PEFT's intruder oracle."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2
from peft import LoraConfig, get_peft_model

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.discovery import find_lora_matrices
from lora_spectral_callback.layers import readable_name


def randomize_lora(model: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """PEFT initialises B = 0; give every adapter a sizeable update so merges and counts are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def merged_by_peft(peft_model, names: list[str]) -> dict[str, torch.Tensor]:
    """(out, in) merged weights from PEFT's merge_and_unload, keyed by our readable names."""
    merged = peft_model.merge_and_unload()
    modules = dict(merged.named_modules())
    out = {}
    for name in names:
        module = modules[name]
        W = module.weight.detach()
        out[name] = W.T if type(module).__name__ == "Conv1D" else W
    return out


def our_merged(model, **kw) -> dict[str, torch.Tensor]:
    matrices, _ = find_lora_matrices(model, **kw)
    return {m.name: m.operator(m.base_weight().detach().double()).dense() for m in matrices}


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=True),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "dense"],
            rank_pattern={"value": 2},
            alpha_pattern={"query": 3},
        ),
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True),
    ],
    ids=["lora", "rslora", "patterns", "dora"],
)
def test_merged_weight_equals_peft_merge(config):
    model = get_peft_model(tiny_bert(), LoraConfig(**config))
    randomize_lora(model)
    ours = our_merged(model)
    assert ours and all(not n.startswith("base_model") for n in ours)
    reference = merged_by_peft(model, list(ours))
    for name, W in ours.items():
        torch.testing.assert_close(W.float(), reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gpt2_conv1d_is_transposed_to_out_by_in():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_lora(model)
    ours = our_merged(model)
    reference = merged_by_peft(model, list(ours))
    for name, W in ours.items():
        assert W.shape == (192, 64)  # c_attn: 64 in, 3*64 out
        torch.testing.assert_close(W.float(), reference[name], rtol=1e-4, atol=1e-5)


def test_several_active_adapters_are_summed_and_merged_ones_skipped():
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["query"]))
    randomize_lora(model)
    model.base_model.set_adapter(["first", "second"])
    matrices, _ = find_lora_matrices(model)
    layer = matrices[0].module
    W0 = layer.get_base_layer().weight.detach().double()
    expected = W0 + layer.get_delta_weight("first").double() + layer.get_delta_weight("second").double()
    torch.testing.assert_close(matrices[0].operator(W0).dense(), expected, rtol=1e-5, atol=1e-6)
    layer.merge(adapter_names=["first"])  # "first" now lives in the base weight: only "second" is an update
    assert matrices[0].adapters == ["second"]


def test_names_filters_and_unsupported_layers_are_reported(caplog):
    assert (
        readable_name("base_model.model.bert.encoder.layer.0.attention.self.query")
        == "bert.encoder.layer.0.attention.self.query"
    )
    config = LoraConfig(r=4, target_modules=["query", "value", "word_embeddings"], use_dora=True)
    model = get_peft_model(tiny_bert(), config)
    matrices, skipped = find_lora_matrices(model, include=r"layer\.1\.")
    assert [m.name for m in matrices] == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    _, skipped = find_lora_matrices(model)
    assert (
        list(skipped) == ["bert.embeddings.word_embeddings"]
        and "DoRA on an Embedding" in skipped["bert.embeddings.word_embeddings"]
    )
    with caplog.at_level(logging.WARNING):
        SpectralMonitor(model, progress=False)
    assert "cannot measure" in caplog.text and "word_embeddings" in caplog.text


def peft_oracle_counts(model, top_k: int, epsilon: float) -> dict[str, int]:
    """Per-layer intruder counts from PEFT's own post-hoc implementation (full SVDs), parsed from its log lines."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=epsilon, logging_sink=lines.append)
    counts = {}
    for line in lines:
        match = re.match(r"(.+): (No intruders|Intruders: (\d+))$", line)
        if match:
            counts[readable_name(match.group(1))] = int(match.group(3) or 0)
    return counts


@pytest.mark.parametrize("exact_below", [512, 0], ids=["exact-svd", "iterative"])
def test_counts_equal_peft_intruder_oracle(exact_below):
    model = get_peft_model(tiny_bert(hidden=128), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    randomize_lora(model, scale=0.25, seed=3)
    report = SpectralMonitor(
        model, epsilon=0.5, exact_below=exact_below, basis_dtype="float32", progress=False
    ).measure(0)
    oracle = peft_oracle_counts(model, top_k=10, epsilon=0.5)
    ours = {name: layer.intruders for name, layer in report.layers.items()}
    assert ours == oracle
    assert 0 < report.intruders_total < 10 * len(ours)  # non-trivial: neither none nor all
