"""A plain layer's weight as the matrix of the linear map it applies, ``(out_features, in_features)``.

Left singular vectors then live in the layer's output space whatever the layer kind: ``Linear`` as stored, GPT-2's
``Conv1D`` (which stores ``(in, out)``) and ``Embedding`` (a lookup applies ``weight.T``) transposed, conv kernels
flattened per output channel. Every model adapter (LoRA layers, other tuners, full fine-tuning) lays weights out
this way.
"""

from __future__ import annotations

from torch import Tensor, nn

from .sharding import full

__all__ = ["is_matrix_layer", "weight_matrix"]


def weight_matrix(module: nn.Module) -> Tensor:
    """A plain layer's weight in the (out, in) layout of :mod:`.layers`: ``Linear`` as stored, GPT-2 ``Conv1D``
    and ``Embedding`` transposed (``(embedding_dim, num_embeddings)``), conv kernels flattened per output channel."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    W = full(weight)  # gathered if it is an FSDP2 shard or a ZeRO-3 partition
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        return W.T
    return W.flatten(1)


def is_matrix_layer(module: nn.Module) -> bool:
    """A layer kind :func:`weight_matrix` lays out: Linear, GPT-2 Conv1D, Embedding, ConvNd."""
    kinds = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
    return isinstance(module, kinds) or type(module).__name__ == "Conv1D"
