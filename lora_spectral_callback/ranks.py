"""The monitor across ranks: who owns which matrix, gathering sharded matrices one at a time, and combining the
ranks' reports on the main process.

Every function here is called on every rank in the same order (the collectives of :mod:`.distributed` underneath
would hang otherwise), and every rank derives the same split without communicating.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .distributed import all_gather_objects, balanced_owners, is_main_process
from .matrix import WeightMatrix
from .report import SpectralReport

__all__ = ["GatherFailed", "combine_reports", "gathered", "owned_share", "shape_only"]


@torch.no_grad()
def owned_share(matrices: Sequence[WeightMatrix], rank: int, world: int) -> list[WeightMatrix]:
    """The matrices ``rank`` snapshots and measures: a share balanced by the cost of a snapshot (``m n min(m, n)``,
    the slow part), the same on every rank."""
    shapes = [matrix.base_weight().shape for matrix in matrices]
    owners = balanced_owners([m * n * min(m, n) for m, n in shapes], world)
    return [matrix for matrix, owner in zip(matrices, owners, strict=True) if owner == rank]


def combine_reports(
    local: SpectralReport | str, step: int | None, order: Sequence[str], epsilons: Sequence[float], started: float
) -> SpectralReport | None:
    """Gather every rank's report (or the text of its failure) and combine the layer reports on the main process,
    in model ``order``; the other ranks get None. A failure on any rank raises on every rank, after the gather, so
    that none waits forever."""
    parts = all_gather_objects(local)
    failures = [f"rank {rank}: {part}" for rank, part in enumerate(parts) if isinstance(part, str)]
    if failures:
        raise RuntimeError("measurement failed on " + "; ".join(failures))
    if not is_main_process():
        return None
    reports = [part for part in parts if isinstance(part, SpectralReport)]
    measured = {name: layer for r in reports for name, layer in r.layers.items()}
    return SpectralReport.from_layers(
        step,
        list(epsilons),
        {name: measured[name] for name in order if name in measured},
        {name: error for r in reports for name, error in r.errors.items()},
        [name for r in reports for name in r.nonfinite_layers],
        time.perf_counter() - started,
        [name for r in reports for name in r.pending],
    )


@dataclass
class GatherFailed:
    """Stands in for a matrix whose gathered copy could not be made (the gathers themselves ran)."""

    name: str
    module: nn.Module
    error: str


def gathered(matrices: Sequence[WeightMatrix]) -> Iterator[WeightMatrix | GatherFailed]:
    """Each matrix in turn, gathered on every rank (``capture()``: full base weight and factors); a failure after its
    gathers becomes an item, so every rank still goes on to the next matrix. One gathered matrix is alive at a
    time."""
    for matrix in matrices:
        item: WeightMatrix | GatherFailed
        try:
            item = matrix.capture()
        except Exception as err:
            item = GatherFailed(matrix.name, matrix.module, f"{type(err).__name__}: {err}")
        yield item
        del item


def shape_only(copy: Tensor) -> Tensor:
    """What a rank that never measures keeps of a pretrained copy: its shape and dtype."""
    return torch.empty(copy.shape, dtype=copy.dtype, device="meta")
