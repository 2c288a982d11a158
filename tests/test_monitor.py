"""SpectralMonitor without a Trainer: reports equal a float64 recount, serialise, and leave global state alone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import reference_counts, tiny_bert
from peft import LoraConfig, get_peft_model
from test_callback import weights_by_name
from test_layers import randomize_lora

from lora_spectral_callback import SpectralMonitor, SpectralReport


@pytest.fixture(scope="module")
def model():
    m = get_peft_model(tiny_bert(hidden=128), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    randomize_lora(m, scale=0.25, seed=5)
    return m


@pytest.mark.parametrize("exact_below", [512, 0], ids=["exact-svd", "iterative"])
def test_report_equals_float64_recount(model, exact_below):
    epsilons = [0.5, 0.2, 0.8]
    report = SpectralMonitor(model, epsilon=epsilons, exact_below=exact_below, progress=False).measure(step=7)
    base, merged = weights_by_name(model)
    totals, per_layer = reference_counts(base, merged, epsilons)
    assert report.step == 7 and report.epsilon == 0.5
    assert report.intruders_total == totals[0.5]
    assert report.intruders_total_by_epsilon == {"0.5": totals[0.5], "0.2": totals[0.2], "0.8": totals[0.8]}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    for name, layer in report.layers.items():
        assert layer.converged and layer.uncertain == 0
        top = torch.linalg.svdvals(merged[name])[:10]
        torch.testing.assert_close(torch.tensor(layer.singular_values, dtype=torch.float64), top, rtol=1e-4, atol=0)
        assert len(layer.max_cos) == 10


def test_report_round_trips_through_json(model):
    report = SpectralMonitor(model, progress=False).measure(step=3)
    again = SpectralReport.from_dict(json.loads(report.to_json()))
    assert again == report


def test_global_rng_untouched_and_memory_accounted(model):
    monitor = SpectralMonitor(model, exact_below=0, progress=False)
    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    monitor.measure()
    assert torch.equal(torch.rand(4), expected)
    # fp16 bases on CPU: one 128x128 half matrix per monitored weight, i.e. the weight's own size in fp16
    assert monitor.basis_bytes() == len(monitor.matrices) * 128 * 128 * 2


def test_bf16_model_is_measured_in_fp32(model):
    m = get_peft_model(tiny_bert(hidden=128), LoraConfig(r=4, target_modules=["query"])).to(torch.bfloat16)
    randomize_lora(m, scale=0.25, seed=6)
    report = SpectralMonitor(m, exact_below=0, progress=False).measure()
    assert not report.errors and report.intruders_total >= 0
    base, merged = weights_by_name(m)
    totals, _ = reference_counts(base, merged, [0.5])
    assert report.intruders_total == totals[0.5]


def test_no_lora_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="No PEFT adapter layer"):
        SpectralMonitor(tiny_bert())
    m = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="include='nothing'"):
        SpectralMonitor(m, include="nothing")


def test_unreadable_sharding_fails_at_construction():
    """FSDP1 flat parameters would be measured as 1-D shards: refused clearly (a real FSDP1 run is refused in
    ``test_distributed.py``; this fakes the wrapper, by class name, in a single process)."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))

    class FullyShardedDataParallel(torch.nn.Module):  # what FSDP1 wraps a model in (by class name)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    with pytest.raises(ValueError, match=r"FSDP1.*use FSDP2"):
        SpectralMonitor(FullyShardedDataParallel(model), progress=False)
