"""PEFT layer kinds and variants, each checked against a float64 recount of PEFT's own merged weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import reference_counts, tiny_bert, tiny_gpt2
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.discovery import find_lora_matrices

EPS = [0.5, 0.7]


def as_matrix(module: nn.Module) -> torch.Tensor:
    """The documented (out, in) layout of a plain (merged or pretrained) layer, written independently of layers.py."""
    W = module.weight.detach()
    if isinstance(module, nn.Embedding):
        return W.T  # a lookup applies weight.T to a one-hot token
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return W.T
    return W.reshape(W.shape[0], -1)  # Linear unchanged; conv kernels flattened per output channel


def plain_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: as_matrix(modules[n]).clone() for n in names}


def randomize_lora(model: nn.Module, scale: float, seed: int = 0) -> None:
    """Give every LoRA factor (and DoRA magnitude) a random value, large enough that some intruders appear."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=g)
                if "magnitude" in name:
                    p.mul_(1 + 0.3 * noise.abs())
                else:
                    p.copy_(noise * scale)


def check_against_merge(peft_model: nn.Module, base_model: nn.Module, k: int = 10, **options) -> dict[str, int]:
    """Monitor totals and per-layer counts equal the float64 recount of ``merge_and_unload()``'s weights."""
    monitor = SpectralMonitor(peft_model, epsilon=EPS, top_k=k, progress=False, strict=True, **options)
    names = [m.name for m in monitor.matrices]
    base = plain_weights(base_model, names)
    monitor.snapshot()
    report = monitor.measure(step=1)
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    merged = plain_weights(merged_model, names)
    totals, per_layer = reference_counts(base, merged, EPS, k=k)
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {f"{e:g}": totals[e] for e in EPS}
    for matrix in monitor.matrices:  # the operator *is* PEFT's merged weight, entry by entry
        dense = matrix.operator(matrix.base_weight().detach().double()).dense()
        torch.testing.assert_close(dense, merged[matrix.name].double(), rtol=1e-5, atol=1e-6)
    for name in names:  # the top singular values are the merged weight's own
        S = torch.linalg.svdvals(merged[name].double())[:k]
        torch.testing.assert_close(
            torch.tensor(report.layers[name].singular_values, dtype=torch.float64), S, rtol=1e-4, atol=1e-5
        )
    return per_layer


def test_dora_matches_merge_and_unload():
    base = tiny_bert(hidden=64)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True)
    )
    randomize_lora(model, scale=0.5)
    per_layer = check_against_merge(model, base)
    assert len(per_layer) == 4 and sum(per_layer.values()) > 0


def test_dora_on_gpt2_conv1d_matches_merge_and_unload():
    base = tiny_gpt2(hidden=64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_lora(model, scale=0.5, seed=1)
    assert sum(check_against_merge(model, base).values()) > 0


def test_embedding_is_monitored_as_dim_by_vocab():
    base = tiny_bert(hidden=64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"])
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_lora(model, scale=1.0, seed=2)
    per_layer = check_against_merge(model, base)
    assert "bert.embeddings.word_embeddings" in per_layer
    (emb,) = [m for m in find_lora_matrices(model)[0] if m.name.endswith("word_embeddings")]
    assert tuple(emb.base_weight().shape) == (64, 100)  # (embedding_dim, num_embeddings)
    assert per_layer["bert.embeddings.word_embeddings"] > 0


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.point = nn.Conv2d(24, 24, 1)
        self.conv1d = nn.Conv1d(24, 12, 5)

    def forward(self, x):
        return self.conv1d(self.point(self.conv2(self.conv1(x))).mean(-1))


@pytest.mark.parametrize("dora", [False, True])
def test_conv_kernels_flattened_match_merge_and_unload(dora):
    base = ConvNet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "point", "conv1d"], use_dora=dora)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_lora(model, scale=0.7, seed=3)
    per_layer = check_against_merge(model, base)
    assert set(per_layer) == {"conv1", "conv2", "point", "conv1d"}
    assert sum(per_layer.values()) > 0


def test_several_active_adapters_are_summed():
    base = tiny_bert(hidden=64)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=16, target_modules=["query", "value"], use_rslora=True))
    randomize_lora(model, scale=0.4, seed=4)
    model.base_model.set_adapter(["default", "second"])
    (matrix, *_), _ = find_lora_matrices(model)
    assert matrix.adapters == ["default", "second"]
    assert sum(check_against_merge(model, base).values()) > 0


def test_bitsandbytes_4bit_and_8bit_bases_are_dequantized():
    bnb = pytest.importorskip("bitsandbytes")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            self.fc2 = bnb.nn.Linear8bitLt(48, 40, bias=False, has_fp16_weights=False)

    torch.manual_seed(0)
    net = Net()
    dense = {"fc1": torch.randn(48, 64), "fc2": torch.randn(40, 48)}
    net.fc1.load_state_dict({"weight": dense["fc1"]})
    net.fc2.load_state_dict({"weight": dense["fc2"]})
    net.fc2.to("cpu")  # Int8Params quantize on a device move
    net.fc1.weight = bnb.nn.Params4bit(dense["fc1"], requires_grad=False, quant_type="nf4")._quantize("cpu")
    net.is_loaded_in_4bit = net.is_loaded_in_8bit = True  # what transformers sets; makes PEFT pick its bnb layers
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    assert [type(m).__module__ for m in (model.base_model.model.fc1, model.base_model.model.fc2)] == [
        "peft.tuners.lora.bnb"
    ] * 2
    randomize_lora(model, scale=0.5, seed=5)

    from peft.utils.integrations import dequantize_module_weight

    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True)
    names = [m.name for m in monitor.matrices]
    assert names == ["fc1", "fc2"]
    modules = dict(model.base_model.model.named_modules())
    base = {n: dequantize_module_weight(modules[n].get_base_layer()).float() for n in names}
    merged = {n: base[n].double() + modules[n].get_delta_weight("default").double() for n in names}
    assert (base["fc1"] - dense["fc1"]).abs().max() > 1e-3  # really quantized: the recount uses the dequantized base
    monitor.snapshot()
    report = monitor.measure(step=0)
    _totals, per_layer = reference_counts(base, merged, EPS)
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert sum(per_layer.values()) > 0


def test_target_parameters_on_a_2d_weight_matches_merge_and_unload():
    base = tiny_bert(hidden=64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], target_parameters=["attention.self.value.weight"])
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_lora(model, scale=0.7, seed=6)
    per_layer = check_against_merge(model, base)
    assert len(per_layer) == 4 and "bert.encoder.layer.0.attention.self.value" in per_layer
    assert sum(per_layer.values()) > 0
