"""When to raise the alarm: intruder thresholds with patience, as a small state machine that can be saved."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import require, require_int
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
    """Alerts once a limit is exceeded (or the weights went non-finite) for ``patience`` consecutive measurements.
    Like Lightning's EarlyStopping, its only state is a counter, exposed through ``state_dict``/``load_state_dict``
    so a resumed run keeps it.

    Counts saturate on wide models (at hidden size 4096 almost any new direction has max |cos| < 0.5, so every
    top-k slot the update reaches is an intruder); the energy share and the sigma ratio grow with the intruders'
    singular values, which the paper (arXiv 2410.21228 v3) ties to forgetting, so they give a graded limit.

    Args:
        max_intruders: Limit on the model-wide count at the primary epsilon (``None``: no limit).
        max_intruders_per_layer: Limit on any single matrix's count (``None``: no limit).
        patience: Consecutive measurements over a limit before an alert.
        max_intruder_energy_share: Limit in [0, 1] on the model-wide share of the top-k spectral energy carried by
            intruders (see :class:`.report.SpectralReport`).
        max_intruder_sigma_ratio: Limit (>= 0) on the largest intruder singular value over sigma_1 of that
            layer's pretrained weight, in any layer.

    An alert fires when a value is strictly greater than its limit.
    """

    def __init__(
        self,
        max_intruders: int | None = None,
        max_intruders_per_layer: int | None = None,
        patience: int = 1,
        *,
        max_intruder_energy_share: float | None = None,
        max_intruder_sigma_ratio: float | None = None,
    ) -> None:
        require_int("max_intruders", max_intruders, 0, optional=True)
        require_int("max_intruders_per_layer", max_intruders_per_layer, 0, optional=True)
        for option, limit, upper in (
            ("max_intruder_energy_share", max_intruder_energy_share, 1.0),
            ("max_intruder_sigma_ratio", max_intruder_sigma_ratio, math.inf),
        ):
            number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
            bound = "in [0, 1]" if upper == 1.0 else ">= 0"
            require(limit is None or (number and 0 <= limit <= upper), option, limit, f"None or a number {bound}")
        require_int("patience", patience, 1)
        self.max_intruders = max_intruders
        self.max_intruders_per_layer = max_intruders_per_layer
        self.max_intruder_energy_share = max_intruder_energy_share
        self.max_intruder_sigma_ratio = max_intruder_sigma_ratio
        self.patience = patience
        self.wait = 0

    @property
    def enabled(self) -> bool:
        limits = (
            self.max_intruders,
            self.max_intruders_per_layer,
            self.max_intruder_energy_share,
            self.max_intruder_sigma_ratio,
        )
        return any(limit is not None for limit in limits)

    def update(self, report: SpectralReport) -> Alert | None:
        """Feed one measurement; returns an Alert when a limit has held for ``patience`` measurements."""
        reasons = []
        if self.max_intruders is not None and report.intruders_total > self.max_intruders:
            reasons.append(f"{report.intruders_total} in total > max_intruders={self.max_intruders}")
        if self.max_intruders_per_layer is not None:
            worst = [(n, r.intruders) for n, r in report.layers.items() if r.intruders > self.max_intruders_per_layer]
            if worst:
                reasons.append(f"{len(worst)} layer(s) > max_intruders_per_layer={self.max_intruders_per_layer}")
        share = report.intruder_energy_share
        if self.max_intruder_energy_share is not None and share > self.max_intruder_energy_share:
            reasons.append(
                f"intruder energy share {share:.3g} > max_intruder_energy_share={self.max_intruder_energy_share}"
            )
        ratio = report.intruder_sigma_ratio
        if self.max_intruder_sigma_ratio is not None and ratio > self.max_intruder_sigma_ratio:
            layer = max(report.layers, key=lambda n: report.layers[n].intruder_sigma_ratio)
            reasons.append(
                f"intruder sigma ratio {ratio:.3g} in {layer} > max_intruder_sigma_ratio={self.max_intruder_sigma_ratio}"
            )
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
