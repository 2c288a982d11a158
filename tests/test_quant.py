"""bitsandbytes 4-bit bases recognised by their quantization state whatever the storage dtype (FSDP-QLoRA stores nf4
codes in bfloat16), on CPU: counts equal a float64 recount on the weights bitsandbytes dequantizes."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_counts
from peft import LoraConfig, get_peft_model
from test_layers import randomize_lora
from torch import nn

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.discovery import find_lora_matrices

bnb = pytest.importorskip("bitsandbytes")

EPS = [0.5, 0.7]


def quantized_net(quant_type: str, storage: torch.dtype, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Two 4-bit linears as transformers loads them (codes in ``storage``), and the weights they dequantize to."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = bnb.nn.Linear4bit(64, 48, bias=False, quant_type=quant_type, quant_storage=storage)
            self.fc2 = bnb.nn.Linear4bit(48, 40, bias=False, quant_type=quant_type, quant_storage=storage)

    torch.manual_seed(seed)
    net = Net()
    dense = {}
    for name in ("fc1", "fc2"):
        layer = getattr(net, name)
        W = torch.randn(layer.out_features, layer.in_features)
        param = bnb.nn.Params4bit(W, False, quant_type=quant_type, quant_storage=storage, module=layer)
        layer.weight = param._quantize("cpu")
        dense[name] = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert layer.weight.dtype == storage and layer.weight.shape[1] == 1  # packed codes, not the matrix
    net.is_loaded_in_4bit = True  # what transformers sets; makes PEFT pick its bnb layers
    return net, dense


def recount(model: nn.Module, dense: dict[str, torch.Tensor]) -> dict[str, int]:
    modules = dict(model.base_model.model.named_modules())
    merged = {n: W.double() + modules[n].get_delta_weight("default").double() for n, W in dense.items()}
    return reference_counts(dense, merged, EPS)[1]


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_counts_equal_float64_recount_whatever_the_storage(quant_type, storage):
    net, dense = quantized_net(quant_type, storage)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    randomize_lora(model, scale=0.5, seed=5)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True)
    assert [m.name for m in monitor.matrices] == ["fc1", "fc2"]
    assert {m.name: tuple(m.base_weight().shape) for m in monitor.matrices} == {"fc1": (48, 64), "fc2": (40, 48)}
    report = monitor.measure(step=0)
    expected = recount(model, dense)
    assert report.errors == {} and report.nonfinite_layers == []
    assert {n: r.intruders for n, r in report.layers.items()} == expected
    assert sum(expected.values()) > 0


def test_4bit_state_kept_by_the_layer_when_a_wrapper_dropped_it_from_the_parameter():
    """FSDP swaps a ``Params4bit`` for a plain parameter of its bf16 storage; ``Linear4bit.quant_state`` still holds
    the state (bitsandbytes restores it from there in forward), and so does the monitor."""
    net, dense = quantized_net("nf4", torch.bfloat16, seed=1)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    for layer in (net.fc1.base_layer, net.fc2.base_layer):  # FSDP wraps the PEFT model
        layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)
        assert getattr(layer.weight, "quant_state", None) is None and layer.quant_state is not None
    randomize_lora(model, scale=0.5, seed=6)
    report = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True).measure(step=0)
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == recount(model, dense)


def test_capture_reads_no_quantized_weight(monkeypatch):
    """Asynchronous mode captures on the training thread: a frozen 4-bit base is read later, not dequantized there."""
    net, _ = quantized_net("nf4", torch.bfloat16)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    matrices, _ = find_lora_matrices(model)
    calls = []
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda *a, **k: calls.append(a))
    captured = [m.capture() for m in matrices]
    assert calls == [] and all(c.base is None for c in captured)
