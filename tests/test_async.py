"""asynchronous=True: same reports as the synchronous path, the stop still happens, worker failures never crash."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from helpers import RandomTokens, tiny_bert
from peft import LoraConfig, get_peft_model
from training import make_trainer

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor
from lora_spectral_callback.background import BackgroundMeasurer


def lora_bert():
    torch.manual_seed(0)  # random (non-zero) B: intruders from step 0 on
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(tiny_bert(), config)


def train(tmp_path, max_steps: int, **callback_options):
    callback = LoRASpectralCallback(log_dir=str(tmp_path / "tb"), progress=False, **callback_options)
    trainer = make_trainer(
        tmp_path / "out",
        lora_bert(),
        [callback],
        max_steps,
        data=RandomTokens(n=64),
        learning_rate=5e-3,
        logging_strategy="no",
    )
    trainer.train()
    return trainer, callback


@pytest.fixture
def recorded(monkeypatch):
    """Every report SpectralMonitor.measure returns, from whichever thread."""
    reports = []
    measure = SpectralMonitor.measure

    def spy(self, *args, **kwargs):
        reports.append(measure(self, *args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(SpectralMonitor, "measure", spy)
    return reports


def comparable(report) -> dict:
    data = report.to_dict()
    data.pop("seconds")
    for layer in data["layers"].values():
        layer.pop("seconds")
    return data


def test_async_reports_equal_sync_reports(tmp_path, recorded):
    options = dict(max_steps=6, every_n_steps=2, epsilon=[0.3, 0.5, 0.7], exact_below=0)
    sync_trainer, _ = train(tmp_path / "sync", **options)
    sync_reports = list(recorded)
    recorded.clear()
    async_trainer, callback = train(tmp_path / "async", asynchronous=True, **options)
    assert [r.step for r in sync_reports] == [r.step for r in recorded] == [0, 2, 4, 6]
    assert [comparable(r) for r in sync_reports] == [comparable(r) for r in recorded]
    spectral = lambda t: [e for e in t.state.log_history if "spectral/intruders_total" in e]  # noqa: E731
    assert spectral(sync_trainer) == spectral(async_trainer)  # logged at the step each describes
    assert sync_reports[0].intruders_total > 0 and not callback._background.busy


def test_async_stop_still_happens_with_checkpoint(tmp_path):
    alerts = []
    trainer, _ = train(
        tmp_path, max_steps=40, every_n_steps=20, max_intruders=0, asynchronous=True, on_alert=alerts.append
    )
    assert alerts[0].step == 0  # the measurement of step 0 raised it
    assert 0 < trainer.state.global_step <= 20  # delivered at a later step, at the latest the next measurement
    assert os.path.isdir(tmp_path / "out" / f"checkpoint-{trainer.state.global_step}")
    first = next(e for e in trainer.state.log_history if "spectral/intruders_total" in e)
    assert first["step"] == 0 and first["spectral/intruders_total"] > 0


def test_worker_failure_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(SpectralMonitor, "measure", broken)
    with caplog.at_level(logging.WARNING):
        trainer, _ = train(tmp_path, max_steps=4, every_n_steps=2, asynchronous=True)
    assert trainer.state.global_step == 4
    assert "boom" in caplog.text


def test_one_measurement_in_flight():
    measurer = BackgroundMeasurer(SpectralMonitor(lora_bert(), progress=False))
    measurer.submit(0)
    with pytest.raises(RuntimeError, match="in flight"):
        measurer.submit(1)
    report = measurer.collect(wait=True)
    assert report.step == 0 and not measurer.busy and measurer.collect(wait=True) is None
