"""SpectralSchedule: what every training-loop integration needs around a :class:`SpectralMonitor`.

A loop that is not a transformers ``Trainer`` (Lightning, Fabric, a hand-written loop) needs the same few things:
a baseline measurement, a measurement every N optimizer steps and one at the end, a writer, and an alert decision
with patience. This class holds them; the framework adapter only says which step it is, whether this process is
the main one, and how to make every rank agree on a stop (each framework has its own collective for that).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from .. import IntruderThreshold, MetricWriter, SpectralConfig, SpectralMonitor, SpectralReport
from ..config import require_int
from ..writers import headline_metrics

logger = logging.getLogger(__name__)

__all__ = ["SpectralSchedule"]

# the keyword options that are alert limits (IntruderThreshold's), not SpectralConfig fields
_LIMITS = ("max_intruders", "max_intruders_per_layer", "max_intruder_energy_share", "max_intruder_sigma_ratio")


class SpectralSchedule:
    """Measure a model at step 0, every ``every_n_steps`` optimizer steps and at the end; record; decide on alerts.

    Only the main process measures (and holds the pretrained bases), unless the model's weights are sharded, when
    every rank measures its share of the matrices (``SpectralMonitor.collective``). :meth:`measure` returns the
    *local* stop decision; the caller makes the ranks agree (Lightning: ``strategy.reduce_boolean_decision``).

    Args:
        every_n_steps: Measure every N optimizer steps (and at :meth:`start`, and at the end).
        patience: Consecutive measurements over a limit before an alert.
        stop_training: Ask to stop on an alert (NaN/Inf weights only with ``stop_on_nonfinite``).
        stop_on_nonfinite: Also stop when a weight becomes NaN/Inf.
        writer: Where every report goes in full (e.g. a :class:`~lora_spectral_callback.TensorBoardWriter`);
            ``None``: only the headline numbers, through ``log``.
        on_alert: ``callable(report)`` called on an alert.
        log: ``callable(metrics, step)`` that hands the headline numbers to the framework's loggers.
        **options: The alert limits of :class:`~lora_spectral_callback.IntruderThreshold` (``max_intruders``,
            ``max_intruders_per_layer``, ``max_intruder_energy_share``, ``max_intruder_sigma_ratio``) and
            :class:`~lora_spectral_callback.SpectralConfig` fields (``top_k``, ``epsilon``, ``include``, ...).

    Raises:
        ValueError: A bad option, before training starts.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        patience: int = 1,
        stop_training: bool = True,
        stop_on_nonfinite: bool = False,
        writer: MetricWriter | None = None,
        on_alert: Callable[[SpectralReport], Any] | None = None,
        log: Callable[[dict[str, float], int], Any] | None = None,
        **options: Any,
    ) -> None:
        require_int("every_n_steps", every_n_steps, 1)
        limits = {name: options.pop(name) for name in _LIMITS if name in options}
        self.threshold = IntruderThreshold(patience=patience, **limits)
        self.config = SpectralConfig(**options)  # checked now, not at the first step; the monitor takes it as it is
        self.every_n_steps = every_n_steps
        self.stop_training = stop_training
        self.stop_on_nonfinite = stop_on_nonfinite
        self.writer = writer
        self.on_alert = on_alert
        self.log = log
        self.monitor: SpectralMonitor | None = None
        self.last_report: SpectralReport | None = None
        self.last_measured_step = -1  # kept in checkpoints (state_dict), so a resumed run keeps its schedule

    def start(self, model: nn.Module, is_main: bool, step: int = 0) -> bool:
        """Find the monitored layers, start the snapshot of the pretrained bases and take the baseline measurement
        (unless a restored state already has one). Returns the local stop decision, like :meth:`measure`."""
        if self.monitor is None:
            self.monitor = SpectralMonitor(model, self.config)
        if is_main or self.monitor.collective:
            self.monitor.start()  # in the background when it is slow (SpectralConfig.snapshot)
        return self.last_measured_step < 0 and self.measure(step, is_main)

    def due(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps so far) is a measurement step not measured yet."""
        return step % self.every_n_steps == 0 and step > self.last_measured_step

    def measure(self, step: int, is_main: bool) -> bool:
        """Measure now, write, log and check the limits; True when this process asks to stop."""
        monitor = self.monitor
        if monitor is None:
            raise RuntimeError("SpectralSchedule.measure before start()")
        self.last_measured_step = step
        if not (is_main or monitor.collective):
            return False
        report = monitor.measure(step)
        if report is None:  # a non-main rank of a collective measurement
            return False
        self.last_report = report
        if self.writer is not None:
            self.writer.write(report, step)
        if self.log is not None:
            self.log(headline_metrics(report), step)
        alert = self.threshold.update(report)
        if alert is None:
            return False
        logger.warning("lora-spectral-callback: %s", alert.message())
        if self.on_alert is not None:
            self.on_alert(report)
        return self.stop_on_nonfinite if alert.nonfinite else self.stop_training

    def finish(self, step: int, is_main: bool) -> None:
        """The final measurement (if ``step`` was not measured yet), of every layer: a background snapshot is waited
        for first, so no thread outlives training; then close the writer."""
        monitor = self.monitor
        if monitor is not None and (is_main or monitor.collective):
            monitor.snapshot()
        if monitor is not None and step > self.last_measured_step:
            self.measure(step, is_main)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def state_dict(self) -> dict[str, int]:
        return {"last_measured_step": self.last_measured_step, **self.threshold.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_measured_step = int(state.get("last_measured_step", -1))
        self.threshold.load_state_dict(state)
