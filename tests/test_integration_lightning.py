"""PyTorch Lightning Trainer and Fabric on CPU with a PEFT model: schedule, counts against a float64 recount,
numbers in the run's own logger, and the stop."""

from __future__ import annotations

import csv

import pytest
import torch
from integration_helpers import assert_counts_match
from torch.utils.data import DataLoader
from training import lora_bert

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install lightning)")
from helpers import RandomTokens  # noqa: E402

from lora_spectral_callback.integrations.lightning import SpectralCallback, SpectralFabricCallback  # noqa: E402

EPS = [0.5, 0.7]


class LoRAClassifier(pl.LightningModule):
    def __init__(self, random_update: bool) -> None:
        super().__init__()
        self.model = lora_bert(random_update=random_update)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-2)


def fit(tmp_path, callback, random_update: bool = False, max_steps: int = 6) -> tuple[pl.Trainer, LoRAClassifier]:
    torch.manual_seed(0)
    module = LoRAClassifier(random_update)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(RandomTokens(32), batch_size=8))
    return trainer, module


def logged(trainer: pl.Trainer, tag: str) -> dict[int, float]:
    """(step -> value) of one metric as the CSVLogger wrote it to disk."""
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return {int(row["step"]): float(row[tag]) for row in csv.DictReader(f) if row.get(tag)}


def test_lightning_counts_match_recount_and_reach_the_logger(tmp_path):
    callback = SpectralCallback(every_n_steps=2, epsilon=EPS, progress=False, strict=True)
    trainer, module = fit(tmp_path, callback)
    report = callback.schedule.last_report
    assert trainer.global_step == 6 and report.step == 6 and len(report.layers) == 4
    assert report.effective_rank_mean > 1.0  # the adapters did train
    assert_counts_match(report, module.model, EPS, prefix="model.")
    totals = logged(trainer, "spectral/intruders_total")
    assert sorted(totals) == [0, 2, 4, 6]
    assert totals[6] == report.intruders_total
    assert logged(trainer, "spectral/effective_rank_mean")[6] == pytest.approx(report.effective_rank_mean)
    assert trainer.callback_metrics["spectral/intruders_total"].item() == report.intruders_total


def test_lightning_alert_stops_training(tmp_path):
    alerts = []
    callback = SpectralCallback(every_n_steps=2, max_intruders=0, on_alert=alerts.append, progress=False)
    trainer, module = fit(tmp_path, callback, max_steps=20)
    # B = 0 at init: no intruder at step 0; the first measurement after training has some, and the fit ends there
    assert [r.step for r in alerts] == [2] and alerts[0].intruders_total > 0
    assert trainer.global_step == 2 and callback.schedule.last_report is alerts[0]
    assert_counts_match(alerts[0], module.model, [0.5], prefix="model.")


def test_lightning_schedule_survives_a_checkpoint(tmp_path):
    callback = SpectralCallback(every_n_steps=2, patience=3, max_intruders=0, progress=False)
    trainer, _ = fit(tmp_path, callback, random_update=True, max_steps=3)
    state = callback.state_dict()
    assert state == {"last_measured_step": 3, "wait": 3} and trainer.global_step == 3
    resumed = SpectralCallback(every_n_steps=2, progress=False)
    resumed.load_state_dict(state)
    assert not resumed.schedule.due(2) and resumed.schedule.due(4)
    assert resumed.schedule.threshold.wait == 3


def test_fabric_callback_measures_and_stops(tmp_path):
    from lightning.fabric import Fabric

    callback = SpectralFabricCallback(every_n_steps=2, max_intruders=0, epsilon=EPS, progress=False, strict=True)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback], loggers=[])
    torch.manual_seed(0)
    model = lora_bert(random_update=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model, optimizer = fabric.setup(model, optimizer)
    fabric.call("on_train_start", fabric=fabric, model=model)
    step = 0
    for step, batch in enumerate(DataLoader(RandomTokens(160), batch_size=8), start=1):
        fabric.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        fabric.call("on_train_batch_end", fabric=fabric, step=step)
        if callback.should_stop:
            break
    fabric.call("on_train_end", fabric=fabric, step=step)
    # no intruder at step 0 (B = 0), some at the first measurement after training: the loop leaves there
    report = callback.schedule.last_report
    assert step == 2 and report.step == 2 and report.intruders_total > 0
    assert next(iter(report.layers)) == "bert.encoder.layer.0.attention.self.query"  # fabric's wrapper is not named
    assert_counts_match(report, model.module, EPS)
