"""PyTorch Lightning and Fabric: intruder dimensions measured live, in the run's own loggers, with early stop.

``Trainer(callbacks=[SpectralCallback(every_n_steps=50, max_intruders=20)])`` measures the ``LightningModule``'s
PEFT adapters; ``Fabric(callbacks=[SpectralFabricCallback(...)])`` does the same in a Fabric loop through
``fabric.call``. Both only translate the framework's events for :class:`~.schedule.SpectralSchedule`. Needs
``lightning`` (``pip install lightning``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.wrappers import is_wrapped

from .schedule import SpectralSchedule

__all__ = ["SpectralCallback", "SpectralFabricCallback"]


class SpectralCallback(pl.Callback):
    """Measure the LoRA-merged weights of the ``LightningModule`` every ``every_n_steps`` optimizer steps.

    Measures at fit start (step 0), every ``every_n_steps`` steps of ``trainer.global_step`` (optimizer steps, so
    gradient accumulation is counted as the Trainer counts it) and at the end. The headline numbers
    (``spectral/intruders_total``, ``spectral/effective_rank_mean``, ``spectral/intruder_energy_share``,
    ``spectral/intruder_sigma_ratio``) go to every logger of the Trainer at the measured step, and are readable
    from ``trainer.callback_metrics``; pass ``writer=TensorBoardWriter(dir)`` for every per-layer tag and
    histogram. On an alert, ``trainer.should_stop`` is set on every rank together (the strategy's own
    ``reduce_boolean_decision``, as ``EarlyStopping`` does). Only rank 0 measures (sharded strategies: every rank
    measures its share). The schedule and patience are saved in checkpoints, so a resumed fit continues them.

    Args:
        every_n_steps: Measure every N optimizer steps.
        **kwargs: Alert limits, ``stop_training``, ``writer``, ``on_alert`` and
            :class:`~lora_spectral_callback.SpectralConfig` fields: see :class:`~.schedule.SpectralSchedule`.
    """

    def __init__(self, every_n_steps: int = 50, **kwargs: Any) -> None:
        self.schedule = SpectralSchedule(every_n_steps, **kwargs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.log = lambda metrics, step: _log(trainer, pl_module, metrics, step)
        self._act(trainer, self.schedule.start(pl_module, trainer.is_global_zero, trainer.global_step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.schedule.due(trainer.global_step):
            self._act(trainer, self.schedule.measure(trainer.global_step, trainer.is_global_zero))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.finish(trainer.global_step, trainer.is_global_zero)

    def _act(self, trainer: pl.Trainer, stop: bool) -> None:
        # every rank calls this at the same steps: the decision is a collective
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)


def _log(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], step: int) -> None:
    """Straight to the loggers at the measured step (``pl_module.log`` would wait for ``log_every_n_steps``), and
    into ``callback_metrics`` for other callbacks (``ModelCheckpoint(monitor=...)``)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step)
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})


class SpectralFabricCallback:
    """The Fabric way: ``Fabric(callbacks=[cb])``, then in the loop ``fabric.call("on_train_start", fabric=fabric,
    model=model)``, ``fabric.call("on_train_batch_end", fabric=fabric, step=step)`` after each optimizer step and
    ``fabric.call("on_train_end", fabric=fabric, step=step)``; leave the loop when ``cb.should_stop`` (the same on
    every rank). The headline numbers go to ``fabric.log_dict``. Arguments as :class:`SpectralCallback`.
    """

    def __init__(self, every_n_steps: int = 50, **kwargs: Any) -> None:
        self.schedule = SpectralSchedule(every_n_steps, **kwargs)
        self.should_stop = False

    def on_train_start(self, fabric: Any, model: Any) -> None:
        self.schedule.log = lambda metrics, step: fabric.log_dict(metrics, step)
        inner = model.module if is_wrapped(model) else model  # fabric.setup's wrapper: names without its prefix
        self._act(fabric, self.schedule.start(inner, fabric.is_global_zero))

    def on_train_batch_end(self, fabric: Any, step: int) -> None:
        if self.schedule.due(step):
            self._act(fabric, self.schedule.measure(step, fabric.is_global_zero))

    def on_train_end(self, fabric: Any, step: int) -> None:
        self.schedule.finish(step, fabric.is_global_zero)

    def _act(self, fabric: Any, stop: bool) -> None:
        self.should_stop = fabric.strategy.reduce_boolean_decision(stop, all=False) or self.should_stop
