"""Quantized base weights (bitsandbytes 4-bit and 8-bit, HQQ, torchao): recognised by what they are, read as the
float matrix they stand for.

A bitsandbytes 4-bit weight (``Params4bit``) packs two 4-bit codes per byte into ``bnb_4bit_quant_storage``: uint8 by
default, but bfloat16 or float32 where FSDP must shard it like the float parameters around it (FSDP-QLoRA). Then
its storage is a float tensor of shape ``(numel / (2 * itemsize), 1)``, which ``is_floating_point()`` takes for a
weight. What makes it quantized is its quantization state (block scales, code book, the real shape and dtype), held
by the parameter (``quant_state``) or, where a wrapper swapped the parameter for a plain one (FSDP), by the
``Linear4bit`` owning it (bitsandbytes restores it from there in ``forward``). 8-bit weights are stored as int8.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .sharding import logical_shape

__all__ = ["dequantized", "is_quantized", "quant_state", "weight_shape"]


def quant_state(weight: Tensor, owner: nn.Module | None = None) -> Any:
    """The bitsandbytes 4-bit quantization state of ``weight`` (from the parameter, else its owning layer), or
    None for any other weight."""
    state = getattr(weight, "quant_state", None)
    return state if state is not None else getattr(owner, "quant_state", None)


def is_quantized(weight: Tensor, owner: nn.Module | None = None) -> bool:
    """Whether ``weight`` is stored quantized: a 4-bit quantization state whatever the storage dtype, or an integer
    storage (8-bit). A ``Params4bit`` not quantized yet (no state) still holds its float weight and is not."""
    return quant_state(weight, owner) is not None or not weight.is_floating_point()


def weight_shape(weight: Tensor, owner: nn.Module | None = None) -> torch.Size:
    """The shape of the matrix a (possibly quantized or sharded) weight stands for: a 4-bit state's own shape, not
    the packed storage's."""
    state = quant_state(weight, owner)
    return torch.Size(state.shape) if state is not None else logical_shape(weight)


def dequantized(base: nn.Module) -> Tensor:
    """The float weight of a quantized layer. 4-bit: ``bitsandbytes.functional.dequantize_4bit`` with the state
    found by :func:`quant_state`, which reads any storage dtype (PEFT's ``dequantize_module_weight`` dispatches on
    the class name ``Params4bit`` and returns a plain parameter's packed storage unchanged). Otherwise PEFT's
    ``dequantize_module_weight`` (8-bit, HQQ, torchao)."""
    weight = base.weight
    assert isinstance(weight, Tensor)
    state = quant_state(weight, base)
    if state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, state)
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(base)
