"""The few collectives the monitor needs (every rank must take part in each, in the same order, or training hangs),
and the split of its work across ranks, which every rank derives alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["all_gather_objects", "any_rank", "balanced_owners", "is_main_process", "rank_and_world", "sent_from"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    if not _initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def any_rank(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on some rank. All ranks must call it at the same step.

    Under DDP only rank 0 decides on alerts, so its stop has to reach the others; a single-process run returns
    ``flag`` untouched.
    """
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a single process."""
    if rank_and_world()[1] == 1:
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def sent_from(obj: Any, source: int) -> Any:
    """``obj`` of rank ``source`` (picklable), on every rank; ``obj`` itself in a single process."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def balanced_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that handles each item: greedy longest-processing-time assignment by cost, within 4/3 of the best
    balance (Graham 1969). Deterministic, so every rank derives the same split without communicating."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[i] = min(range(world_size), key=lambda r: load[r])
        load[owners[i]] += costs[i]
    return owners


def _collective_device() -> torch.device:
    """NCCL only moves CUDA tensors (on this rank's device); gloo and the others CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
