"""Pictures: their data against float64 recounts, and the callback writing them to TensorBoard on schedule."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.figures import (
    cosine_heatmap,
    figure_layers,
    grid_position,
    intruder_grid,
    require_matplotlib,
    spectrum_plot,
    summary_markdown,
)
from tests.helpers import tiny_bert
from tests.test_cli import one_thread, randomize_lora  # noqa: F401  (fixture re-used)
from tests.training import make_trainer


@pytest.fixture(scope="module")
def measured():
    model = get_peft_model(
        tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    randomize_lora(model, scale=0.2)
    monitor = SpectralMonitor(model, progress=False)
    report = monitor.measure(step=7)
    return model, monitor, report


@torch.no_grad()
def reference_cosines(module, n: int, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 full SVDs of the pretrained and merged weight: |U[:, :k]^T U0[:, :n]| (k x n) and sigma0[:n]."""
    W0 = module.base_layer.weight.double()
    W = (
        W0
        + module.scaling["default"]
        * module.lora_B["default"].weight.double()
        @ module.lora_A["default"].weight.double()
    )
    U0, S0, _ = torch.linalg.svd(W0)
    U = torch.linalg.svd(W)[0]
    return (U[:, :k].T @ U0[:, :n]).abs(), S0[:n]


def test_heatmap_data_equals_float64_recount(measured):
    model, monitor, report = measured
    name = "bert.encoder.layer.1.attention.self.value"
    spectra = monitor.spectra([name])[name]
    expected, sigma0 = reference_cosines(model.base_model.model.get_submodule(name), n=20)
    # fp16-stored pretrained basis moves a cosine by <= 4.9e-4 (metrics.basis_rounding_error)
    np.testing.assert_allclose(np.array(spectra.cosines), expected.numpy(), atol=1e-3)
    # the pretrained spectrum comes from the snapshot's SVD, in the float32 compute dtype
    np.testing.assert_allclose(spectra.pretrained_singular_values, sigma0.numpy(), rtol=1e-5)

    layer = report.layers[name]
    fig = cosine_heatmap(name, layer, spectra, report.epsilon)
    heat, strip = fig.axes[0].images[0].get_array(), fig.axes[1].images[0].get_array()
    np.testing.assert_allclose(heat, expected.numpy().T, atol=1e-3)  # rows: pretrained, columns: merged
    np.testing.assert_allclose(strip[0], layer.max_cos)
    red = [t.get_text() for t in fig.axes[1].get_xticklabels() if t.get_color() == "red"]
    assert len(red) == layer.intruders > 0


def test_spectrum_plot_lines(measured):
    _, monitor, report = measured
    name = "bert.encoder.layer.0.attention.self.query"
    spectra = monitor.spectra([name], n_pretrained=15)[name]
    fig = spectrum_plot(name, report.layers[name], spectra)
    pretrained, merged = fig.axes[0].get_lines()
    assert fig.axes[0].get_yscale() == "log"
    np.testing.assert_allclose(pretrained.get_ydata(), spectra.pretrained_singular_values)
    np.testing.assert_allclose(merged.get_ydata(), report.layers[name].singular_values)
    assert len(pretrained.get_ydata()) == 15


def test_intruder_grid_places_counts(measured):
    _, _, report = measured
    assert grid_position("bert.encoder.layer.12.attention.self.query") == (
        "bert.encoder.layer.12",
        "attention.self.query",
    )
    assert grid_position("lm_head") == ("lm_head", "")
    fig = intruder_grid(report)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2, 2)  # layers 0, 1 x query, value
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1"]
    for name, layer in report.layers.items():
        block, kind = grid_position(name)
        assert grid[int(block[-1]), ["attention.self.query", "attention.self.value"].index(kind)] == layer.intruders


def test_summary_and_layer_choice(measured):
    _, _, report = measured
    ranked = figure_layers(report, None)
    assert [report.layers[n].intruders for n in ranked] == sorted(
        (r.intruders for r in report.layers.values()), reverse=True
    )
    assert figure_layers(report, 1) == ranked[:1]
    text = summary_markdown(report)
    assert text.startswith(f"**step 7**: {report.intruders_total} intruder dimension(s)")
    assert f"| {ranked[0]} | {report.layers[ranked[0]].intruders} |" in text


def test_missing_matplotlib_fails_at_construction(monkeypatch):
    from lora_spectral_callback.callback import LoRASpectralCallback

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"image_every_n_measurements needs matplotlib.*\[viz\]"):
        require_matplotlib("image_every_n_measurements")
    with pytest.raises(ValueError, match="image_every_n_measurements needs matplotlib"):
        LoRASpectralCallback(image_every_n_measurements=1)
    LoRASpectralCallback()  # pictures off: matplotlib not needed


def test_callback_writes_pictures_on_schedule(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_spectral_callback.callback import LoRASpectralCallback

    with pytest.raises(ValueError, match="image_every_n_measurements=0 is invalid"):
        LoRASpectralCallback(image_every_n_measurements=0)
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    callback = LoRASpectralCallback(
        every_n_steps=1, image_every_n_measurements=2, image_layers=1, log_dir=str(tmp_path / "tb"), progress=False
    )
    make_trainer(tmp_path / "out", model, [callback], 3, learning_rate=1e-2, seed=42).train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    # measurements at steps 0, 1, 2, 3: pictures at the 1st, the 3rd, and the last
    assert [e.step for e in events.Images("spectral/intruder_grid")] == [0, 2, 3]
    cosine = [t for t in events.Tags()["images"] if t.startswith("spectral/cosine/")]
    assert 1 <= len(cosine) <= 2  # one layer per measurement, the most intruded (may change between steps)
    assert [e.step for e in events.Tensors("spectral/summary/text_summary")] == [0, 1, 2, 3]
