"""Monitoring must never take a training run down: run a step, and on failure log it once and carry on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import TypeVar

from .report import SpectralReport

__all__ = ["FAILED", "FaultGuard", "NonFinite"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Failed:
    """The type of :data:`FAILED`."""

    def __repr__(self) -> str:
        return "FAILED"


FAILED = _Failed()  # what a guarded call returns when it failed (None can be a legitimate result)


class FaultGuard:
    """Runs monitoring steps so that a failure is logged (once per kind), recorded and skipped.

    ``strict=True`` re-raises instead, for tests and debugging. Warnings are deduplicated by a key so that a fault
    that repeats at every measurement (a full disk, a broken hook) is logged once, not every 50 steps.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._warned: set[Hashable] = set()

    def __call__(self, what: str, fn: Callable[[], T], report: SpectralReport | None = None) -> T | _Failed:
        """``fn()``, or :data:`FAILED` after logging; the reason goes to ``report.errors[what]`` when a report is
        given, so that ``spectral/errors`` counts it."""
        try:
            return fn()
        except Exception as err:
            if self.strict:
                raise
            reason = f"{type(err).__name__}: {err}"
            if report is not None:
                report.errors[what] = reason
            self.warn_once((what, type(err).__name__), f"{what} failed and was skipped (logged once): {reason}")
            return FAILED

    def warn_once(self, key: Hashable, message: str) -> None:
        """Log ``message`` as a warning the first time ``key`` is seen."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("lora-spectral-callback: %s", message)


class NonFinite(ValueError):
    """NaN/Inf in the weights: a real training failure, reported as such (``nonfinite_layers``, an alert) rather
    than as a monitoring error, and never re-raised by ``strict``."""
