"""End to end inside a real transformers Trainer: schedule, TensorBoard tags and values, log history, early stop."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from helpers import RandomTokens, reference_counts, tiny_bert
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training import make_trainer

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor, SpectralReport
from lora_spectral_callback.writers import default_log_dir

TARGETS = ["query", "value"]


def lora_bert(seed: int = 0):
    return get_peft_model(tiny_bert(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def train(model, callback, output_dir, max_steps=12, lr=5e-2, **kw):
    trainer = make_trainer(
        output_dir,
        model,
        [callback],
        max_steps,
        data=RandomTokens(),
        learning_rate=lr,
        logging_steps=4,
        report_to=["tensorboard"],
        **kw,
    )
    trainer.train()
    return trainer


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


def weights_by_name(model) -> tuple[dict, dict]:
    """(pretrained, merged) float64 weights of every LoRA layer, keyed by readable name."""
    monitor = SpectralMonitor(model, progress=False)
    base = {m.name: m.base_weight().detach().double() for m in monitor.matrices}
    merged = {m.name: m.operator(base[m.name]).dense() for m in monitor.matrices}
    return base, merged


def test_tensorboard_tags_values_and_schedule(tmp_path):
    model = lora_bert()
    callback = LoRASpectralCallback(every_n_steps=5, epsilon=[0.5, 0.3], log_dir=str(tmp_path / "tb"), progress=False)
    trainer = train(model, callback, tmp_path / "out", max_steps=12)
    assert trainer.state.global_step == 12

    scalars, acc = read_scalars(str(tmp_path / "tb"))
    names = [m.name for m in callback.monitor.matrices]
    assert len(names) == 4
    # measured at step 0, every 5 steps, and at the end of training
    assert sorted(scalars["spectral/intruders_total"]) == [0, 5, 10, 12]
    assert scalars["spectral/intruders_total"][0] == 0  # B = 0 at init: the merged weight is the pretrained one
    expected = {
        "spectral/intruders_total",
        "spectral/intruders_total/eps_0.5",
        "spectral/intruders_total/eps_0.3",
        "spectral/effective_rank_mean",
        "spectral/errors",
    }
    expected |= {f"spectral/intruders/{n}" for n in names} | {f"spectral/effective_rank/{n}" for n in names}
    assert expected <= set(scalars)
    assert {f"spectral/singular_values/{n}" for n in names} <= set(acc.Tags()["histograms"])

    # the last logged values are those of the final weights, recounted independently in float64
    base, merged = weights_by_name(model)
    totals, per_layer = reference_counts(base, merged, [0.5, 0.3])
    assert scalars["spectral/intruders_total"][12] == totals[0.5] > 0
    assert scalars["spectral/intruders_total/eps_0.3"][12] == totals[0.3]
    for name in names:
        assert scalars[f"spectral/intruders/{name}"][12] == per_layer[name]
        ranks = torch.linalg.svdvals(merged[name] - base[name])[:4]
        p = ranks / ranks.sum()
        assert scalars[f"spectral/effective_rank/{name}"][12] == pytest.approx(
            torch.exp(-(p * p.log()).sum()).item(), rel=1e-5
        )
    histogram = acc.Histograms(f"spectral/singular_values/{names[0]}")[-1]
    assert histogram.step == 12 and histogram.histogram_value.num == 10
    top = torch.linalg.svdvals(merged[names[0]])[0].item()
    assert histogram.histogram_value.max == pytest.approx(top, rel=1e-4)

    # the headline numbers are in the Trainer's log history (persisted in trainer_state.json)
    history = [h for h in trainer.state.log_history if "spectral/intruders_total" in h]
    assert [h["step"] for h in history] == [0, 5, 10, 12]
    assert history[-1]["spectral/intruders_total"] == totals[0.5]


def test_default_log_dir_is_its_own_run_beside_the_trainers(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = LoRASpectralCallback(every_n_steps=4, progress=False)
    train(lora_bert(), callback, tmp_path / "out", max_steps=4)
    runs = tmp_path / "out" / "runs"
    assert callback.resolved_log_dir == str(runs / "spectral") == default_log_dir(str(tmp_path / "out"))
    trainer_runs = [d for d in os.listdir(runs) if d != "spectral"]
    assert len(trainer_runs) == 1  # the Trainer's TensorBoardCallback wrote elsewhere: no shared event file
    ours = read_scalars(str(runs / "spectral"))[0]
    assert "spectral/intruders_total" in ours and "train/loss" not in ours

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb-env"))
    assert default_log_dir("ignored") == str(tmp_path / "tb-env" / "spectral")


def test_max_intruders_stops_at_the_right_step_with_a_checkpoint(tmp_path):
    alerts: list[SpectralReport] = []
    callback = LoRASpectralCallback(
        every_n_steps=3, max_intruders=2, log_dir=str(tmp_path / "tb"), on_alert=alerts.append, progress=False
    )
    trainer = train(lora_bert(), callback, tmp_path / "out", max_steps=30)
    history = [h for h in trainer.state.log_history if "spectral/intruders_total" in h]
    over = [h["step"] for h in history if h["spectral/intruders_total"] > 2]
    assert over, "the learning rate is meant to create intruders"
    stop_step = over[0]
    assert trainer.state.global_step == stop_step < 30  # stopped at the first measurement over the limit
    assert [h["step"] for h in history][-1] == stop_step
    assert len(alerts) == 1 and alerts[0].step == stop_step and alerts[0].intruders_total > 2
    assert callback.last_alert.offenders and "max_intruders=2" in callback.last_alert.message()
    checkpoint = tmp_path / "out" / f"checkpoint-{stop_step}"
    assert checkpoint.is_dir() and (checkpoint / "adapter_model.safetensors").exists()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["global_step"] == stop_step


def test_patience_and_per_layer_limit(tmp_path):
    callback = LoRASpectralCallback(
        every_n_steps=2, max_intruders_per_layer=0, patience=3, log_dir=str(tmp_path / "tb"), progress=False
    )
    trainer = train(lora_bert(), callback, tmp_path / "out", max_steps=30)
    history = [h for h in trainer.state.log_history if "spectral/intruders_total" in h]
    first_over = next(i for i, h in enumerate(history) if h["spectral/intruders_total"] > 0)
    # three consecutive measurements with a layer over the limit before stopping (counts only grow here)
    assert trainer.state.global_step == history[first_over + 2]["step"]
    assert [h["spectral/alert_wait"] for h in history[first_over:]] == [1, 2, 3]


def test_alert_without_stop(tmp_path):
    callback = LoRASpectralCallback(
        every_n_steps=3, max_intruders=0, stop_training=False, log_dir=str(tmp_path / "tb"), progress=False
    )
    trainer = train(lora_bert(), callback, tmp_path / "out", max_steps=9)
    assert trainer.state.global_step == 9 and callback.last_alert is not None
    assert not glob.glob(str(tmp_path / "out" / "checkpoint-*"))
