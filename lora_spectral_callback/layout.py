"""A plain layer's weight as the matrix of the linear map it applies, ``(out_features, in_features)``.

Left singular vectors then live in the layer's output space whatever the layer kind: ``Linear`` as stored, GPT-2's
``Conv1D`` (which stores ``(in, out)``) and ``Embedding`` (a lookup applies ``weight.T``) transposed, conv kernels
flattened per output channel. Every model adapter (LoRA layers, other tuners, full fine-tuning) lays weights out
this way.
"""

from __future__ import annotations

import math

from torch import Size, Tensor, nn

from .sharding import full, logical_shape

__all__ = ["is_matrix_layer", "laid_out_shape", "matrix_shape", "weight_matrix"]


def weight_matrix(module: nn.Module) -> Tensor:
    """A plain layer's weight in the (out, in) layout of :mod:`.layers`: ``Linear`` as stored, GPT-2 ``Conv1D``
    and ``Embedding`` transposed (``(embedding_dim, num_embeddings)``), conv kernels flattened per output channel."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    W = full(weight)  # gathered if it is an FSDP2 shard or a ZeRO-3 partition
    return W.T if _stored_transposed(module) else W.flatten(1)


def matrix_shape(module: nn.Module) -> Size:
    """The shape of :func:`weight_matrix`, read without gathering a shard."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return laid_out_shape(logical_shape(weight), _stored_transposed(module))


def laid_out_shape(stored: Size, transposed: bool) -> Size:
    """The (out, in) shape of a weight stored as ``stored``: swapped if stored transposed, else the kernel dimensions
    flattened into the input one."""
    if transposed:
        return Size((stored[1], stored[0]))
    return Size((stored[0], math.prod(stored[1:])))


def _stored_transposed(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores ``(in, out)``; an ``Embedding`` table is applied as ``weight.T``."""
    return isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"


def is_matrix_layer(module: nn.Module) -> bool:
    """A layer kind :func:`weight_matrix` lays out: Linear, GPT-2 Conv1D, Embedding, ConvNd."""
    kinds = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
    return isinstance(module, kinds) or type(module).__name__ == "Conv1D"
