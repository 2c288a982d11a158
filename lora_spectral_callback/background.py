"""Asynchronous measurement: measure on a worker thread (:class:`~.worker.Worker`) while training goes on.

At a measurement step only the LoRA factors (and DoRA magnitudes) are copied, O((m+n) r) per matrix; the
measurement itself runs on the worker and its report is collected at a later step. At most one measurement is in
flight: collecting with ``wait=True`` blocks until it is done (the callback does that at the next measurement step
and at train end, so no measurement is dropped). The background snapshot (``SpectralMonitor.snapshot(wait=False)``,
:mod:`.snapshot`) runs on the same kind of worker.

Assumption: the base weights are frozen while the worker runs (true for LoRA: they have ``requires_grad=False``
and no optimizer touches them), so it reads them from the live model instead of copying them; a base weight that
requires grad is copied at capture time. Merging adapters, moving or re-sharding the model while the worker runs
is not supported (the callback does not work in the background on a sharded model). On a CPU the worker shares the
cores with training: it removes the stall, not the compute.
"""

from __future__ import annotations

from .monitor import SpectralMonitor
from .report import SpectralReport
from .worker import Worker

__all__ = ["BackgroundMeasurer"]


class BackgroundMeasurer:
    """Runs ``monitor.measure`` on captured LoRA state in one worker thread, at most one at a time."""

    def __init__(self, monitor: SpectralMonitor) -> None:
        self.monitor = monitor
        self._worker: Worker[SpectralReport | None] | None = None

    @property
    def busy(self) -> bool:
        """A measurement was submitted and not yet collected."""
        return self._worker is not None

    def submit(self, step: int) -> None:
        """Copy the LoRA state now and start measuring it in the background (collect the previous one first)."""
        if self.busy:
            raise RuntimeError("a measurement is still in flight: collect() it first")
        captured = self.monitor.capture()
        self._worker = Worker(
            "lora-spectral-measure", lambda: self.monitor.measure(step, captured), self.monitor.device
        )

    def collect(self, wait: bool) -> SpectralReport | None:
        """The finished report, or None when nothing is finished (``wait=False``) or nothing was submitted.
        A failure in the worker is re-raised here, on the training thread."""
        worker = self._worker
        if worker is None or (not wait and not worker.done):
            return None
        self._worker = None
        return worker.result()
