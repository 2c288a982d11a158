"""The signals that do not saturate (intruder energy share, sigma ratio, first intruder position): per layer and
model-wide equal to a float64 recount by hand, alerts on them, JSON, and their behaviour where counts saturate."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import reference_signals, tiny_bert
from peft import LoraConfig, get_peft_model
from test_callback import lora_bert, read_scalars, train, weights_by_name
from test_layers import randomize_lora

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor, SpectralReport
from lora_spectral_callback.alerts import IntruderThreshold
from lora_spectral_callback.metrics import first_intruder_position, intruder_energy_share, intruder_sigma_ratio
from lora_spectral_callback.writers import headline_metrics, scalar_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    m = get_peft_model(tiny_bert(hidden=128), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    randomize_lora(m, scale=0.025, seed=5)  # two layers with intruders (at ranks 7 and 10), two without
    return m


@pytest.mark.parametrize("exact_below", [512, 0], ids=["exact-svd", "iterative"])
def test_signals_equal_float64_recount(model, exact_below):
    report = SpectralMonitor(model, epsilon=[0.5, 0.3], exact_below=exact_below, progress=False).measure(step=1)
    base, merged = weights_by_name(model)
    per_layer, (share, ratio, first) = reference_signals(base, merged, 0.5)
    values = {n: (r.intruder_energy_share, r.intruder_sigma_ratio, r.first_intruder) for n, r in report.layers.items()}
    assert values.keys() == per_layer.keys()
    for name, (ref_share, ref_ratio, ref_first) in per_layer.items():
        got_share, got_ratio, got_first = values[name]
        assert got_share == pytest.approx(ref_share, rel=1e-4, abs=1e-7)
        assert got_ratio == pytest.approx(ref_ratio, rel=1e-4)
        assert got_first == ref_first
        assert report.layers[name].pretrained_sigma1 == pytest.approx(torch.linalg.svdvals(base[name])[0].item())
    # the fixture mixes layers with no intruder, some, and only some of the top-k energy intruding
    assert any(v[0] == 0 for v in per_layer.values()) and any(0 < v[0] < 1 for v in per_layer.values())
    assert report.intruder_energy_share == pytest.approx(share, rel=1e-4)
    assert report.intruder_sigma_ratio == pytest.approx(ratio, rel=1e-4)
    assert report.first_intruder == first < 11

    scalars = scalar_metrics(report)
    assert headline_metrics(report)["spectral/intruder_energy_share"] == report.intruder_energy_share
    assert scalars["spectral/intruder_sigma_ratio"] == report.intruder_sigma_ratio
    assert scalars["spectral/first_intruder"] == first
    for name, (ref_share, ref_ratio, ref_first) in per_layer.items():
        assert scalars[f"spectral/intruder_energy_share/{name}"] == pytest.approx(ref_share, rel=1e-4, abs=1e-7)
        assert scalars[f"spectral/intruder_sigma_ratio/{name}"] == pytest.approx(ref_ratio, rel=1e-4)
        assert scalars[f"spectral/first_intruder/{name}"] == ref_first


def test_no_intruder_reads_zero_zero_and_k_plus_one():
    m = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))  # B = 0: the pretrained weights
    report = SpectralMonitor(m, top_k=6, progress=False).measure()
    assert report.intruders_total == 0
    assert (report.intruder_energy_share, report.intruder_sigma_ratio, report.first_intruder) == (0.0, 0.0, 7)
    assert {(r.intruder_energy_share, r.intruder_sigma_ratio, r.first_intruder) for r in report.layers.values()} == {
        (0.0, 0.0, 7)
    }


def test_metric_functions_at_their_edges():
    sigma, cos = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0.9, 0.2, 0.1])
    assert intruder_energy_share(sigma, cos, 0.5) == pytest.approx(5 / 14)
    assert intruder_energy_share(sigma, cos, 0.2) == pytest.approx(1 / 14)  # strictly below epsilon
    assert intruder_energy_share(torch.zeros(3), cos, 0.5) == 0.0  # no energy at all
    assert intruder_sigma_ratio(sigma, cos, 0.5, pretrained_sigma1=4.0) == 0.5
    assert intruder_sigma_ratio(sigma, cos, 0.5, pretrained_sigma1=0.0) == math.inf
    assert intruder_sigma_ratio(sigma, cos, 0.05, pretrained_sigma1=4.0) == 0.0
    assert first_intruder_position(cos, 0.5) == 2 and first_intruder_position(cos, 0.05) == 4


def test_model_wide_aggregates_and_empty_report_is_nan(model):
    report = SpectralMonitor(model, progress=False).measure()
    shares = [r.intruder_energy_share for r in report.layers.values()]
    assert report.intruder_energy_share == pytest.approx(sum(shares) / len(shares))
    assert report.intruder_sigma_ratio == max(r.intruder_sigma_ratio for r in report.layers.values())
    assert report.first_intruder == min(r.first_intruder for r in report.layers.values())

    empty = SpectralReport.from_layers(0, [0.5], {}, errors={"x": "failed"})
    assert math.isnan(empty.intruder_energy_share) and math.isnan(empty.intruder_sigma_ratio)
    assert empty.first_intruder is None and "spectral/first_intruder" not in scalar_metrics(empty)
    again = SpectralReport.from_dict(json.loads(empty.to_json()))
    assert math.isnan(again.intruder_energy_share) and again.first_intruder is None


def test_new_fields_round_trip_through_json(model):
    report = SpectralMonitor(model, progress=False).measure(step=3)
    again = SpectralReport.from_dict(json.loads(report.to_json()))
    assert again == report
    assert (
        again.layers[next(iter(report.layers))].intruder_sigma_ratio
        == next(iter(report.layers.values())).intruder_sigma_ratio
    )


def test_thresholds_alert_strictly_above_with_patience(model):
    report = SpectralMonitor(model, progress=False).measure(step=4)
    share, ratio = report.intruder_energy_share, report.intruder_sigma_ratio
    assert 0 < share < 1 and ratio > 0
    assert IntruderThreshold(max_intruder_energy_share=share).update(report) is None  # equal: no alert
    alert = IntruderThreshold(max_intruder_energy_share=share * 0.99).update(report)
    assert alert is not None and alert.step == 4 and "max_intruder_energy_share" in alert.message()

    worst = max(report.layers, key=lambda n: report.layers[n].intruder_sigma_ratio)
    waiting = IntruderThreshold(patience=2, max_intruder_sigma_ratio=ratio * 0.99)
    assert waiting.update(report) is None and waiting.wait == 1
    alert = waiting.update(report)
    assert alert is not None and worst in alert.reasons[0] and "max_intruder_sigma_ratio" in alert.reasons[0]
    assert IntruderThreshold(max_intruder_sigma_ratio=ratio).update(report) is None
    assert IntruderThreshold(max_intruder_sigma_ratio=0.0).enabled


@pytest.mark.parametrize("name", ["max_intruder_energy_share", "max_intruder_sigma_ratio"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), "0.5", True])
def test_invalid_signal_limits(name, value):
    with pytest.raises(ValueError, match=rf"{name}=.* is invalid: must be None or a number"):
        IntruderThreshold(**{name: value})
    with pytest.raises(ValueError, match=rf"{name}=.* is invalid"):
        LoRASpectralCallback(**{name: value})
    with pytest.raises(ValueError, match=r"max_intruder_energy_share=1.5 is invalid: must be None or a number in"):
        IntruderThreshold(max_intruder_energy_share=1.5)


def test_callback_stops_on_sigma_ratio_and_logs_the_tags(tmp_path):
    callback = LoRASpectralCallback(
        every_n_steps=3, max_intruder_sigma_ratio=0.05, log_dir=str(tmp_path / "tb"), progress=False
    )
    trainer = train(lora_bert(), callback, tmp_path / "out", max_steps=30)
    history = [h for h in trainer.state.log_history if "spectral/intruders_total" in h]
    over = [h["step"] for h in history if h["spectral/intruder_sigma_ratio"] > 0.05]
    assert over and trainer.state.global_step == over[0] < 30
    assert "max_intruder_sigma_ratio=0.05" in callback.last_alert.message()
    scalars, _ = read_scalars(str(tmp_path / "tb"))
    names = [m.name for m in callback.monitor.matrices]
    assert {"spectral/intruder_energy_share", "spectral/intruder_sigma_ratio", "spectral/first_intruder"} <= set(
        scalars
    )
    assert {f"spectral/first_intruder/{n}" for n in names} <= set(scalars)
    assert scalars["spectral/intruder_sigma_ratio"][over[0]] == pytest.approx(callback.last_report.intruder_sigma_ratio)


def test_counts_saturate_where_sigma_ratio_keeps_growing():
    spec = importlib.util.spec_from_file_location("saturation", ROOT / "benchmarks" / "saturation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = module.saturation_rows(dim=512, scales=(0.1, 0.5, 2.0, 4.0))
    counts = [r["intruders"] for r in rows]
    assert counts[0] == 0 and counts[-2] == counts[-1] == 10  # every top-10 slot taken: the count is flat
    assert rows[-2]["energy_share"] == rows[-1]["energy_share"] == 1.0  # so is the share (all top-k intrude)
    assert rows[-1]["sigma_ratio"] > 1.9 * rows[-2]["sigma_ratio"]  # the ratio still follows the update
    assert 0 < rows[1]["energy_share"] < rows[1]["intruders"] / 10  # a few weak intruders: little energy
    assert [r["min_max_cos"] < 0.5 for r in rows] == [False, True, True, True]
