"""Measure without stalling training: copy the small LoRA state at the step, compute on one worker thread.

At a measurement step only the LoRA factors (and DoRA magnitudes) are copied, O((m+n) r) per matrix; the
measurement itself runs on a single daemon thread and its report is collected at a later step. At most one
measurement is in flight: collecting with ``wait=True`` blocks until it is done (the callback does that at the
next measurement step and at train end, so no measurement is ever dropped).

Assumption: the base weights are frozen while a measurement runs (true for LoRA: they have ``requires_grad=False``
and no optimizer touches them), so the worker reads them from the live model instead of copying them; a base
weight that requires grad is copied at capture time. Merging adapters, moving or re-sharding the model while a
measurement is in flight is not supported (the callback does not run in the background on a sharded model). On
CUDA the worker runs on its own stream, ordered after the copies. On CPU the worker shares the cores with training: it removes the stall, not the compute.
"""

from __future__ import annotations

import logging
import threading

import torch

from .monitor import SpectralMonitor
from .report import SpectralReport

logger = logging.getLogger(__name__)

__all__ = ["BackgroundMeasurer"]


class BackgroundMeasurer:
    """Runs ``monitor.measure`` on captured LoRA state in one worker thread, at most one at a time."""

    def __init__(self, monitor: SpectralMonitor) -> None:
        self.monitor = monitor
        self._thread: threading.Thread | None = None
        self._outcome: tuple[SpectralReport | None, BaseException | None] = (None, None)

    @property
    def busy(self) -> bool:
        """A measurement was submitted and not yet collected."""
        return self._thread is not None

    def submit(self, step: int) -> None:
        """Copy the LoRA state now and start measuring it in the background (collect the previous one first)."""
        if self.busy:
            raise RuntimeError("a measurement is still in flight: collect() it first")
        self.monitor.snapshot()  # the one-time SVDs stay on the calling thread, before training steps race
        captured = self.monitor.capture()
        stream = _side_stream(self.monitor)
        self._outcome = (None, None)
        self._thread = threading.Thread(
            target=self._run, args=(step, captured, stream), name="lora-spectral-measure", daemon=True
        )
        self._thread.start()

    def _run(self, step: int, captured: list, stream) -> None:
        try:
            if stream is None:
                report = self.monitor.measure(step, captured)
            else:
                with torch.cuda.stream(stream):
                    report = self.monitor.measure(step, captured)
            self._outcome = (report, None)
        except BaseException as err:  # delivered to the training thread by collect()
            self._outcome = (None, err)

    def collect(self, wait: bool) -> SpectralReport | None:
        """The finished report, or None when nothing is finished (``wait=False``) or nothing was submitted.

        A failure in the worker is re-raised here, on the training thread, where the callback's guard logs it
        (or re-raises it with ``strict=True``).
        """
        if self._thread is None or (not wait and self._thread.is_alive()):
            return None
        self._thread.join()
        self._thread = None
        report, error = self._outcome
        self._outcome = (None, None)
        if error is not None:
            raise error
        return report


def _side_stream(monitor: SpectralMonitor):
    """A CUDA stream for the worker, ordered after the work queued so far (the captures), or None on CPU."""
    device = monitor.matrices[0].base_weight().device
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream
