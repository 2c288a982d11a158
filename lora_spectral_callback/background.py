"""Work off the training thread: background measurement, and the background snapshot.

:class:`Worker` runs one function on a daemon thread (on CUDA, on a stream of its own) and hands its result or its
exception back to the caller. Two things use it:

- **asynchronous measurement** (:class:`BackgroundMeasurer`): at a measurement step only the LoRA factors (and
  DoRA magnitudes) are copied, O((m+n) r) per matrix; the measurement itself runs on the worker and its report is
  collected at a later step. At most one measurement is in flight: collecting with ``wait=True`` blocks until it is
  done (the callback does that at the next measurement step and at train end, so no measurement is dropped);
- **the background snapshot** (``SpectralMonitor.snapshot(wait=False)``): the pretrained SVDs, while training runs.

Assumption: the base weights are frozen while the worker runs (true for LoRA: they have ``requires_grad=False``
and no optimizer touches them), so it reads them from the live model instead of copying them; a base weight that
requires grad is copied at capture time. Merging adapters, moving or re-sharding the model while the worker runs
is not supported (the callback does not work in the background on a sharded model). On a CPU the worker shares the
cores with training: it removes the stall, not the compute.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from .report import SpectralReport

if TYPE_CHECKING:
    from .monitor import SpectralMonitor

__all__ = ["BackgroundMeasurer", "Worker"]

T = TypeVar("T")


class Worker(Generic[T]):
    """``fn()`` on one daemon thread, started at once; ``result()`` waits for it and re-raises its failure on the
    calling thread (where the callback's guard logs it, or re-raises it with ``strict=True``).

    On CUDA (``device``) the thread runs on a stream of its own, ordered after the work queued so far on the
    current stream (the copies a capture just made), so it overlaps with training instead of queueing behind it.
    """

    def __init__(self, name: str, fn: Callable[[], T], device: torch.device) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
        self._thread = threading.Thread(target=self._run, args=(fn, stream), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T], stream: torch.cuda.Stream | None) -> None:
        try:
            if stream is None:
                self._value = fn()
            else:
                with torch.cuda.stream(stream):
                    self._value = fn()
                stream.synchronize()  # results are complete before result() hands them over
        except BaseException as err:  # delivered to the calling thread by result()
            self._error = err

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> T | None:
        """Wait for the thread; its return value, or its exception raised here."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value


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
