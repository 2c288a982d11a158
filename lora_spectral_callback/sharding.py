"""Sharded parameters: gather them for measurement, and refuse the sharding schemes we cannot read.

FSDP2 (``torch.distributed.fsdp.fully_shard``, accelerate/transformers ``fsdp_version=2``) and tensor parallelism
store parameters as ``DTensor`` shards; ``full_tensor()`` all-gathers one, so it is a **collective**: every rank
must gather the same parameters in the same order, or training hangs. The monitor therefore gathers one matrix
at a time on every rank (see ``SpectralMonitor.measure``) and measures it on the main process only.

FSDP1 (``FullyShardedDataParallel``, flat parameters) and DeepSpeed ZeRO-3 (``ds_id`` partitioned parameters)
hide the weights behind their own gather contexts; they are refused with a clear error instead of measuring
empty or partial shards.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["full", "module_is_sharded", "unsupported_sharding"]


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor: all-gathered (a collective, see the module docstring) if it is a ``DTensor`` shard,
    else ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def module_is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` (recursively) is a ``DTensor`` shard."""
    return any(_is_dtensor(p) for p in module.parameters())


def unsupported_sharding(model: nn.Module) -> str | None:
    """Why the model's parameters cannot be read (FSDP1 flat parameters, DeepSpeed ZeRO-3), or None."""
    fsdp1 = any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()) or any(
        getattr(p, "_fsdp_flattened", False) for p in model.parameters()  # FSDP1's tag, also on the inner model
    )
    if fsdp1:
        return (
            "FSDP1 (FullyShardedDataParallel) keeps parameters in sharded flat buffers that this monitor does not "
            "gather: use FSDP2 instead (torch fully_shard, or fsdp_version=2 in accelerate/transformers)"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return (
            "DeepSpeed ZeRO-3 partitions parameters and this monitor does not gather them: use ZeRO-1/2, or FSDP2 "
            "(fsdp_version=2)"
        )
    return None

