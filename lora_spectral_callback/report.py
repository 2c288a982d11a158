"""What one measurement found: plain dataclasses that serialise to a dict / JSON and back."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "LayerSpectra", "SpectralReport"]


def _eps_key(epsilon: float) -> str:
    return f"{epsilon:g}"


@dataclass
class LayerReport:
    """Spectral state of one merged weight ``W0 + dW``.

    ``max_cos[i]`` is the largest |cosine| between the i-th top left singular vector of the merged matrix and any
    pretrained left singular vector; it is an intruder at ``epsilon`` iff ``max_cos[i] < epsilon``.
    ``uncertain`` counts vectors whose ``max_cos`` lies closer to some threshold than its error bound
    (the count could flip under exact arithmetic); it is 0 whenever ``converged`` holds.

    Attributes:
        intruders: Intruder count at the primary epsilon.
        intruders_by_epsilon: Count at every epsilon, keyed by ``f"{epsilon:g}"``.
        max_cos: One value per top-k vector: 1 = a pretrained direction, 0 = a brand-new one.
        singular_values: Top-k singular values of the merged matrix.
        effective_rank: Effective rank (Roy & Vetterli) of the update ``dW``.
        converged: Whether the solver met its error bound.
        iterations: Solver iterations in this measurement.
        uncertain: Decisions closer to a threshold than the arithmetic can resolve.
        seconds: Wall time of this layer's measurement.
    """

    intruders: int
    intruders_by_epsilon: dict[str, int]
    max_cos: list[float]
    singular_values: list[float]
    effective_rank: float
    converged: bool = True
    iterations: int = 0
    uncertain: int = 0
    seconds: float = 0.0


@dataclass
class LayerSpectra:
    """What a picture of one layer needs beyond its :class:`LayerReport` (paper Fig. 1 view).

    ``cosines[i][j] = |<u_i, u0_j>|`` for the merged top-k left singular vectors ``u_i`` and the pretrained top-n
    ``u0_j``; ``pretrained_singular_values`` are the top-n singular values of the pretrained weight. Not part of
    the report (it is k x n numbers per layer): computed only when pictures are asked for.
    """

    cosines: list[list[float]]
    pretrained_singular_values: list[float]


@dataclass
class SpectralReport:
    """One measurement of the whole model; ``intruders_total`` is at the primary (first) epsilon.

    Totals sum the measured ``layers``; a layer in ``errors`` (skipped) or in ``pending`` (its background snapshot
    is not done yet) is not in them.

    Attributes:
        step: Optimizer step of the measurement (``None`` outside training, e.g. the CLI).
        epsilon: The primary threshold.
        intruders_total: Intruders summed over the measured matrices, at the primary epsilon.
        intruders_total_by_epsilon: The same at every epsilon, keyed by ``f"{epsilon:g}"``.
        effective_rank_mean: Mean effective rank of the updates over the measured matrices.
        layers: ``{layer name: LayerReport}``.
        errors: ``{layer or component: reason}`` for what failed in this measurement.
        nonfinite_layers: Layers whose weights hold NaN/Inf (not measured).
        seconds: Wall time of the measurement.
        pending: Layers whose pretrained snapshot (running in the background) has not reached them yet.
    """

    step: int | None
    epsilon: float
    intruders_total: int
    intruders_total_by_epsilon: dict[str, int]
    effective_rank_mean: float
    layers: dict[str, LayerReport] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    nonfinite_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)  # layers whose background snapshot is not done yet

    @classmethod
    def from_layers(
        cls,
        step: int | None,
        epsilons: list[float],
        layers: dict[str, LayerReport],
        errors: dict[str, str] | None = None,
        nonfinite_layers: list[str] | None = None,
        seconds: float = 0.0,
        pending: list[str] | None = None,
    ) -> SpectralReport:
        """Sum per-layer counts into model-wide totals (paper: counts are summed over the model's matrices)."""
        totals = {_eps_key(e): sum(r.intruders_by_epsilon[_eps_key(e)] for r in layers.values()) for e in epsilons}
        ranks = [r.effective_rank for r in layers.values()]
        return cls(
            step=step,
            epsilon=epsilons[0],
            intruders_total=totals[_eps_key(epsilons[0])],
            intruders_total_by_epsilon=totals,
            effective_rank_mean=sum(ranks) / len(ranks) if ranks else math.nan,
            layers=layers,
            errors=dict(errors or {}),
            nonfinite_layers=list(nonfinite_layers or []),
            seconds=seconds,
            pending=list(pending or []),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralReport:
        data = dict(data)
        data["layers"] = {name: LayerReport(**layer) for name, layer in data.get("layers", {}).items()}
        return cls(**data)

    def offenders(self, limit: int | None = None) -> list[tuple[str, int]]:
        """Layers with intruders at the primary epsilon, most first."""
        ranked = sorted(((n, r.intruders) for n, r in self.layers.items() if r.intruders), key=lambda x: -x[1])
        return ranked[:limit] if limit else ranked
