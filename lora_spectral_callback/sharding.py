"""Sharded parameters: gather them for measurement, and refuse the sharding scheme we cannot read.

Two schemes are read:

- FSDP2 (``torch.distributed.fsdp.fully_shard``; accelerate/transformers ``fsdp_version=2``) and tensor
  parallelism store parameters as ``DTensor`` shards, gathered with ``full_tensor()``;
- DeepSpeed ZeRO-3 partitions parameters (tagged ``ds_id``; outside forward a weight reads as an empty tensor
  and ``ds_shape`` holds its real shape), gathered with ``deepspeed.zero.GatheredParameters``.

Either gather is a **collective**: every rank must gather the same parameters in the same order, or training
hangs. The monitor therefore gathers one matrix at a time on every rank (see ``SpectralMonitor.measure``), and
measures each on the one rank that owns it: inside :func:`gathered_on`, an FSDP2 shard or a ZeRO-3 partition is
gathered onto that rank alone (each matrix's bytes travel once, to its owner, not to every rank).

FSDP1 (``FullyShardedDataParallel``, flat parameters) hides the weights behind its own whole-model gather
context; it is refused with a clear error instead of measuring flat shards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Size, Tensor, nn

__all__ = ["full", "gathered_on", "logical_shape", "module_is_sharded", "unsupported_sharding"]

_destination = threading.local()  # the rank :func:`full` gathers onto, inside :func:`gathered_on`


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:  # torch < 2.5 kept it private
            from torch.distributed._tensor import DTensor
        except ImportError:  # torch built without distributed support
            return False
    return isinstance(t, DTensor)


def _is_zero3(t: Tensor) -> bool:
    return hasattr(t, "ds_id")


@contextmanager
def gathered_on(rank: int) -> Iterator[None]:
    """Inside, :func:`full` gathers an FSDP2 shard (a ``DTensor`` sharded by rows over one mesh dimension) or a
    partitioned ZeRO-3 parameter onto ``rank`` alone, with one ``gather``; the other ranks get a ``meta`` tensor of
    the whole shape, to drop. Other layouts are gathered onto every rank as usual."""
    _destination.rank = rank
    try:
        yield
    finally:
        _destination.rank = None


def full(t: Tensor) -> Tensor:
    """The whole tensor: gathered (a collective, see the module docstring) if it is a ``DTensor`` shard or a
    ZeRO-3 partition, else ``t`` itself."""
    if _is_dtensor(t):
        destination = getattr(_destination, "rank", None)
        if destination is not None and _rows_sharded_over(t, destination):
            return _gather_rows(t, destination)
        return t.full_tensor()  # type: ignore[attr-defined]  # a DTensor
    if _is_zero3(t):
        destination = getattr(_destination, "rank", None)
        if destination is not None and _partitioned_over(t, destination):
            return _gather_partitions(t, destination)
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().clone()  # the gathered storage is released on leaving the context
    return t


def _rows_sharded_over(t: Tensor, rank: int) -> bool:
    """FSDP2's layout: ``Shard(0)`` over a one-dimensional mesh whose group holds ``rank``."""
    mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]  # a DTensor
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
        return False
    return rank in torch.distributed.get_process_group_ranks(mesh.get_group())


def _gather_rows(t: Tensor, rank: int) -> Tensor:
    """A row-sharded ``DTensor`` gathered onto ``rank`` (``torch.distributed.gather`` of the local rows, padded to
    ``torch.chunk``'s equal chunks); a ``meta`` tensor of the whole shape elsewhere."""
    group = t.device_mesh.get_group()  # type: ignore[attr-defined]  # a DTensor
    rows, world = t.shape[0], torch.distributed.get_world_size(group)
    chunk = -(-rows // world)
    local = t.to_local()  # type: ignore[attr-defined]
    padded = local.new_zeros((chunk, *t.shape[1:]))
    padded[: local.shape[0]] = local
    mine = torch.distributed.get_rank() == rank
    parts = [torch.empty_like(padded) for _ in range(world)] if mine else None
    torch.distributed.gather(padded, parts, dst=rank, group=group)
    if parts is None:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return torch.cat(parts)[:rows]


def _partitioned_over(t: Tensor, rank: int) -> bool:
    """A ZeRO-3 parameter partitioned now (its data empty, its partition ``ds_tensor`` in memory, not swapped out)
    over a group that holds ``rank``."""
    part = getattr(t, "ds_tensor", None)
    group = getattr(t, "ds_process_group", None)
    if part is None or t.numel() != 0 or part.numel() != getattr(part, "ds_numel", -1):
        return False
    return rank in torch.distributed.get_process_group_ranks(group)


def _gather_partitions(t: Tensor, rank: int) -> Tensor:
    """A ZeRO-3 parameter gathered onto ``rank`` (its ranks' equal, padded partitions of the flattened tensor, in
    group order); a ``meta`` tensor of the whole shape elsewhere."""
    part, group = t.ds_tensor, t.ds_process_group  # type: ignore[attr-defined]  # DeepSpeed's attributes
    mine = torch.distributed.get_rank() == rank
    parts = [torch.empty_like(part) for _ in range(torch.distributed.get_world_size(group))] if mine else None
    torch.distributed.gather(part.detach(), parts, dst=rank, group=group)
    shape = logical_shape(t)
    if parts is None:
        return torch.empty(shape, dtype=t.dtype, device="meta")
    return torch.cat(parts)[: shape.numel()].view(shape)


def logical_shape(t: Tensor) -> Size:
    """The shape the model computes with (a ZeRO-3 partition's own ``.shape`` is empty between forwards)."""
    return Size(t.ds_shape) if _is_zero3(t) else t.shape  # type: ignore[attr-defined]  # DeepSpeed's attribute


def module_is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` (recursively) is a ``DTensor`` shard or a ZeRO-3 partition."""
    return any(_is_dtensor(p) or _is_zero3(p) for p in module.parameters())


def unsupported_sharding(model: nn.Module) -> str | None:
    """Why the model's parameters cannot be read (FSDP1 flat parameters), or None."""
    fsdp1 = any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()) or any(
        getattr(p, "_fsdp_flattened", False)
        for p in model.parameters()  # FSDP1's tag, also on the inner model
    )
    if fsdp1:
        return (
            "FSDP1 (FullyShardedDataParallel) keeps parameters in sharded flat buffers that this monitor does not "
            "gather: use FSDP2 instead (torch fully_shard, or fsdp_version=2 in accelerate/transformers)"
        )
    return None
