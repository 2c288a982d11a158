"""Sharded parameters: gather them for measurement, and refuse the sharding scheme we cannot read.

Two schemes are read:

- FSDP2 (``torch.distributed.fsdp.fully_shard``; accelerate/transformers ``fsdp_version=2``) and tensor
  parallelism store parameters as ``DTensor`` shards, gathered with ``full_tensor()``;
- DeepSpeed ZeRO-3 partitions parameters (tagged ``ds_id``; outside forward a weight reads as an empty tensor
  and ``ds_shape`` holds its real shape), gathered with ``deepspeed.zero.GatheredParameters``.

Either gather is a **collective**: every rank must gather the same parameters in the same order, or training
hangs. The monitor therefore gathers one matrix at a time on every rank (see ``SpectralMonitor.measure``) and
measures it on the main process only.

FSDP1 (``FullyShardedDataParallel``, flat parameters) hides the weights behind its own whole-model gather
context; it is refused with a clear error instead of measuring flat shards.
"""

from __future__ import annotations

from torch import Size, Tensor, nn

__all__ = ["full", "logical_shape", "module_is_sharded", "unsupported_sharding"]


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


def full(t: Tensor) -> Tensor:
    """The whole tensor: all-gathered (a collective, see the module docstring) if it is a ``DTensor`` shard or a
    ZeRO-3 partition, else ``t`` itself."""
    if _is_dtensor(t):
        return t.full_tensor()  # type: ignore[attr-defined]  # a DTensor
    if _is_zero3(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().clone()  # the gathered storage is released on leaving the context
    return t


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
