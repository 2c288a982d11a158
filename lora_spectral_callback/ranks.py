"""The monitor across ranks: who owns which matrix, gathering sharded matrices one at a time, and combining the
ranks' reports on the main process.

Every function here is called on every rank in the same order (the collectives of :mod:`.distributed` underneath
would hang otherwise), and every rank derives the same split without communicating.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from .distributed import all_gather_objects
from .matrix import WeightMatrix
from .report import SpectralReport
from .sharding import gathered_on

__all__ = ["GatherFailed", "all_or_raise", "combine_reports", "gathered", "rounds", "shape_only", "snapshot_costs"]

T = TypeVar("T")


def snapshot_costs(matrices: Sequence[WeightMatrix]) -> list[int]:
    """What a snapshot of each matrix costs (``m n min(m, n)``, a full SVD: the slow part), from shapes read
    without gathering a shard."""
    return [m * n * min(m, n) for m, n in (matrix.shape() for matrix in matrices)]


def rounds(owner: Sequence[int], costs: Sequence[int], world: int) -> list[list[int]]:
    """Indices of the matrices gathered together, round by round: round ``j`` holds the ``j``-th matrix of each
    rank's share, shares walked from the costliest, so that the ranks measure matrices of similar cost in parallel
    between two rounds of gathers."""
    shares = [sorted((i for i, o in enumerate(owner) if o == rank), key=lambda i: -costs[i]) for rank in range(world)]
    return [[share[j] for share in shares if j < len(share)] for j in range(max(map(len, shares), default=0))]


def all_or_raise(local: T | str, what: str) -> list[T]:
    """Every rank's ``local`` (the text of a failure, or its result), on every rank; a failure on any rank raises on
    every rank, after the gather, so that none waits forever in a later collective."""
    parts = all_gather_objects(local)
    failures = [f"rank {rank}: {part}" for rank, part in enumerate(parts) if isinstance(part, str)]
    if failures:
        raise RuntimeError(f"{what} failed on " + "; ".join(failures))
    return parts


def combine_reports(
    parts: Sequence[SpectralReport], step: int | None, order: Sequence[str], epsilons: Sequence[float], started: float
) -> SpectralReport:
    """The ranks' reports of their shares as one, its layers in model ``order``."""
    measured = {name: layer for r in parts for name, layer in r.layers.items()}
    return SpectralReport.from_layers(
        step,
        list(epsilons),
        {name: measured[name] for name in order if name in measured},
        {name: error for r in parts for name, error in r.errors.items()},
        [name for r in parts for name in r.nonfinite_layers],
        time.perf_counter() - started,
        [name for r in parts for name in r.pending],
    )


@dataclass
class GatherFailed:
    """Stands in for a matrix whose gathered copy could not be made (the gathers themselves ran)."""

    name: str
    module: nn.Module
    error: str


def gathered(
    matrices: Sequence[WeightMatrix], owners: Sequence[int] | None = None
) -> Iterator[WeightMatrix | GatherFailed]:
    """Each matrix in turn, gathered (``capture()``: full base weight and factors) on every rank, or onto its owner
    alone where the sharding allows (:func:`.sharding.gathered_on`; the other ranks get a copy of ``meta`` tensors
    to drop); a failure after its gathers becomes an item, so every rank still goes on to the next matrix. One
    gathered matrix is alive at a time."""
    for i, matrix in enumerate(matrices):
        item: WeightMatrix | GatherFailed
        try:
            with nullcontext() if owners is None else gathered_on(owners[i]):
                item = matrix.capture()
        except Exception as err:
            item = GatherFailed(matrix.name, matrix.module, f"{type(err).__name__}: {err}")
        yield item
        del item


def shape_only(copy: Tensor) -> Tensor:
    """What a rank that never measures keeps of a pretrained copy: its shape and dtype."""
    return torch.empty(copy.shape, dtype=copy.dtype, device="meta")
