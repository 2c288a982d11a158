"""When to raise the alarm: intruder thresholds with patience, as a small state machine that can be saved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .report import SpectralReport

__all__ = ["IntruderThreshold", "Alert"]


@dataclass(frozen=True)
class Alert:
    """Why a measurement crossed the line; ``offenders`` are (layer, intruders) pairs, most first."""

    step: int | None
    intruders_total: int
    offenders: list[tuple[str, int]]
    reasons: list[str]
    nonfinite: bool = False

    def message(self) -> str:
        layers = ", ".join(f"{name}={n}" for name, n in self.offenders[:10]) or "none"
        return f"intruder dimensions at step {self.step}: {'; '.join(self.reasons)} (layers: {layers})"


class IntruderThreshold:
    """Alerts once ``intruders_total > max_intruders`` or any layer exceeds ``max_intruders_per_layer`` (or the
    weights went non-finite) for ``patience`` consecutive measurements. Like Lightning's EarlyStopping, its only
    state is a counter, exposed through ``state_dict``/``load_state_dict`` so a resumed run keeps it.

    Args:
        max_intruders: Limit on the model-wide count at the primary epsilon (``None``: no limit).
        max_intruders_per_layer: Limit on any single matrix's count (``None``: no limit).
        patience: Consecutive measurements over a limit before an alert.
    """

    def __init__(
        self,
        max_intruders: int | None = None,
        max_intruders_per_layer: int | None = None,
        patience: int = 1,
    ) -> None:
        for name, value in (("max_intruders", max_intruders), ("max_intruders_per_layer", max_intruders_per_layer)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}={value!r} is invalid: must be None or an integer >= 0")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience={patience!r} is invalid: must be an integer >= 1")
        self.max_intruders = max_intruders
        self.max_intruders_per_layer = max_intruders_per_layer
        self.patience = patience
        self.wait = 0

    @property
    def enabled(self) -> bool:
        return self.max_intruders is not None or self.max_intruders_per_layer is not None

    def update(self, report: SpectralReport) -> Alert | None:
        """Feed one measurement; returns an Alert when the limit has held for ``patience`` measurements."""
        reasons = []
        if self.max_intruders is not None and report.intruders_total > self.max_intruders:
            reasons.append(f"{report.intruders_total} in total > max_intruders={self.max_intruders}")
        if self.max_intruders_per_layer is not None:
            worst = [(n, r.intruders) for n, r in report.layers.items() if r.intruders > self.max_intruders_per_layer]
            if worst:
                reasons.append(f"{len(worst)} layer(s) > max_intruders_per_layer={self.max_intruders_per_layer}")
        self.wait = self.wait + 1 if reasons else 0
        if report.nonfinite_layers:
            reasons.append(f"NaN/Inf weights in {', '.join(report.nonfinite_layers[:5])}")
        elif not reasons or self.wait < self.patience:
            return None
        return Alert(report.step, report.intruders_total, report.offenders(), reasons, bool(report.nonfinite_layers))

    def state_dict(self) -> dict[str, Any]:
        return {"wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state.get("wait", 0))
