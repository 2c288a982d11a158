"""What one measurement found: plain dataclasses that serialise to a dict / JSON and back."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "LayerSpectra", "SpectralReport", "eps_key"]


def eps_key(epsilon: float) -> str:
    """The key of one threshold in ``intruders_by_epsilon`` (``0.5`` -> ``"0.5"``)."""
    return f"{epsilon:g}"


@dataclass
class LayerReport:
    """Spectral state of one merged weight ``W0 + dW``.

    ``max_cos[i]`` is the largest |cosine| between the i-th top left singular vector of the merged matrix and any
    pretrained left singular vector; it is an intruder at ``epsilon`` iff ``max_cos[i] < epsilon``.
    A ``max_cos`` closer to a threshold than the working precision can place (float32, a float16 basis) is settled
    by a float64 pass over that matrix (``resolved`` counts those decisions), so the counts are those of a float64
    full SVD; ``uncertain`` counts decisions even float64 could not make (expected 0: a cosine within ~1e-12 of a
    threshold, or singular values too close to tell their vectors apart). It is 0 whenever ``converged`` holds.

    Signals that do not saturate on large models, at the primary epsilon, from the same top-k triplets (see
    :mod:`.metrics`; any other epsilon can be recomputed from ``max_cos`` and ``singular_values``):
    ``intruder_energy_share`` (share of the top-k ``sum(sigma^2)`` carried by intruders, 0 if none),
    ``intruder_sigma_ratio`` (largest intruder sigma over ``pretrained_sigma1``, sigma_1 of the pretrained
    weight; 0 if none) and ``first_intruder`` (1-based rank of the strongest intruder, ``k + 1`` if none).

    Attributes:
        intruders: Intruder count at the primary epsilon.
        intruders_by_epsilon: Count at every epsilon, keyed by ``f"{epsilon:g}"``.
        max_cos: One value per top-k vector: 1 = a pretrained direction, 0 = a brand-new one.
        singular_values: Top-k singular values of the merged matrix (empty for a layer reported without its
            snapshot because its update is still zero).
        effective_rank: Effective rank (Roy & Vetterli) of the update ``dW``.
        pretrained_sigma1: Largest singular value of the pretrained weight (NaN when not known yet).
        intruder_energy_share: Share of the top-k spectral energy carried by intruders.
        intruder_sigma_ratio: Largest intruder singular value over ``pretrained_sigma1``.
        first_intruder: 1-based rank of the strongest intruder; ``k + 1`` when there is none.
        converged: Whether the solver met its error bound and no decision is left uncertain.
        iterations: Solver iterations in this measurement (both passes' when the float64 pass settled a decision).
        uncertain: Decisions closer to a threshold than even float64 can resolve (counted as computed).
        resolved: Decisions the working precision left open that a float64 pass settled.
        seconds: Wall time of this layer's measurement.
    """

    intruders: int
    intruders_by_epsilon: dict[str, int]
    max_cos: list[float]
    singular_values: list[float]
    effective_rank: float
    pretrained_sigma1: float
    intruder_energy_share: float
    intruder_sigma_ratio: float
    first_intruder: int
    converged: bool = True
    iterations: int = 0
    uncertain: int = 0
    seconds: float = 0.0
    resolved: int = 0


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
    is not done yet) is not in them. Model-wide aggregates of the per-layer signals (NaN / None when no layer was
    measured):

    - ``intruder_energy_share``: the mean over layers of the per-layer shares. Each matrix counts once, as each
      top-k slot does in ``intruders_total`` (which is ``k * layers`` times the mean share of slots that intrude).
      Weighting by each layer's top-k energy instead would let the matrices with the largest pretrained norms decide:
      in all-MiniLM-L6-v2 sigma_1 ranges from 2.3 (attention outputs) to 11.7 (intermediate), 26x in energy, so an
      intruder stronger than an attention output's own sigma_1 would barely move an energy-weighted share.
    - ``intruder_sigma_ratio``: the maximum over layers, the worst intrusion anywhere (what a stop rule needs;
      the paper ties forgetting to the intruders' singular values, and one strong intruder suffices).
    - ``first_intruder``: the minimum over layers, the highest-ranked intruder anywhere (``k + 1``: none).

    Attributes:
        step: Optimizer step of the measurement (``None`` outside training, e.g. the CLI).
        epsilon: The primary threshold.
        intruders_total: Intruders summed over the measured matrices, at the primary epsilon.
        intruders_total_by_epsilon: The same at every epsilon, keyed by ``f"{epsilon:g}"``.
        effective_rank_mean: Mean effective rank of the updates over the measured matrices.
        intruder_energy_share: Model-wide intruder energy share (above).
        intruder_sigma_ratio: Largest per-layer intruder sigma ratio (above).
        first_intruder: Smallest per-layer first-intruder rank (above).
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
    intruder_energy_share: float
    intruder_sigma_ratio: float
    first_intruder: int | None
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
        """Sum per-layer counts into model-wide totals (paper: counts are summed over the model's matrices) and
        aggregate the per-layer signals (see the class docstring)."""
        totals = {eps_key(e): sum(r.intruders_by_epsilon[eps_key(e)] for r in layers.values()) for e in epsilons}
        ranks = [r.effective_rank for r in layers.values()]
        shares = [r.intruder_energy_share for r in layers.values()]
        return cls(
            step=step,
            epsilon=epsilons[0],
            intruders_total=totals[eps_key(epsilons[0])],
            intruders_total_by_epsilon=totals,
            effective_rank_mean=sum(ranks) / len(ranks) if ranks else math.nan,
            intruder_energy_share=sum(shares) / len(shares) if shares else math.nan,
            intruder_sigma_ratio=max((r.intruder_sigma_ratio for r in layers.values()), default=math.nan),
            first_intruder=min((r.first_intruder for r in layers.values()), default=None),
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

    @property
    def uncertain(self) -> int:
        """Decisions left uncertain, summed over the measured layers (expected 0; see :class:`LayerReport`)."""
        return sum(layer.uncertain for layer in self.layers.values())

    @property
    def resolved(self) -> int:
        """Decisions settled by a float64 pass, summed over the measured layers."""
        return sum(layer.resolved for layer in self.layers.values())

    def offenders(self, limit: int | None = None) -> list[tuple[str, int]]:
        """Layers with intruders at the primary epsilon, most first."""
        ranked = sorted(((n, r.intruders) for n, r in self.layers.items() if r.intruders), key=lambda x: -x[1])
        return ranked[:limit] if limit else ranked
