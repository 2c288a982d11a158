"""One function on a daemon thread, its result or its exception handed back to the caller.

The background snapshot (:mod:`.snapshot`) and asynchronous measurement (:mod:`.background`) both run on it. On
CUDA the thread runs on a stream of its own, so its work overlaps with training instead of queueing behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

__all__ = ["Worker"]

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
