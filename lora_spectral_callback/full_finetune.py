"""Full fine-tuning mode: monitor plain weight matrices (no PEFT) against a copy of their pretrained values.

This is the comparison Shuttleworth et al. 2024 make between LoRA and full fine-tuning. Nothing is frozen, so
the pretrained weight must be *copied* before training moves it: one copy of every monitored matrix, in
``weight_copy_dtype`` (float32: 4 bytes per parameter; float16: 2) on ``basis_device`` (CPU by default; "disk":
safetensors files, memory-mapped, see :meth:`.basis_store.BasisStore.disk_copy`). The
merged weight is simply the current weight, a dense matrix (the solver's low-rank "update" part is absent); the
monitor warm-starts its iterations from the pretrained top singular vectors as usual.

A :class:`DenseMatrix` implements the same small interface as :class:`~.layers.MonitoredMatrix`
(``name``, ``base_weight()``, ``operator(W0)``, ``update_singular_values(device)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .layers import selected
from .linalg import LowRankUpdatedMatrix
from .sharding import full, module_is_sharded

__all__ = ["DenseMatrix", "dense_layers", "find_dense_matrices", "weight_matrix"]


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


def _is_dense_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return is_matrix_layer(module) and isinstance(weight, torch.Tensor) and weight.is_floating_point()


Keep = Callable[[Tensor], Tensor]  # where a copy is kept, e.g. BasisStore.disk_copy (the copy -> its stored form)


@dataclass
class DenseMatrix:
    """One fully fine-tuned layer: a stored copy of its pretrained weight and the live module."""

    name: str
    module: nn.Module
    pretrained: Tensor  # (out, in) copy taken before training
    frozen: Tensor | None = None  # set by capture(): the weight at that step, measured instead of the live one

    @classmethod
    def snapshot_of(
        cls, name: str, module: nn.Module, dtype: torch.dtype, device: str | torch.device, keep: Keep | None = None
    ) -> DenseMatrix:
        with torch.no_grad():
            copy = weight_matrix(module).detach().to(device=device, dtype=dtype, copy=True).contiguous()
        return cls(name, module, copy if keep is None else keep(copy))

    def base_weight(self) -> Tensor:
        """The pretrained copy (not the live weight): the snapshot basis is always the pretrained one."""
        return self.pretrained

    def current_weight(self) -> Tensor:
        return weight_matrix(self.module).detach() if self.frozen is None else self.frozen

    @torch.no_grad()
    def capture(self) -> DenseMatrix:
        """This layer as it is now, for measuring later (asynchronous mode): a full fine-tune trains the weight
        itself, so unlike LoRA's small factors the whole current weight is copied (its size, once per capture)."""
        current = self.current_weight()
        return replace(self, frozen=current if module_is_sharded(self.module) else current.clone())  # gathered: a copy

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        """The fine-tuned weight as a dense operator, in ``W0``'s dtype and device."""
        return LowRankUpdatedMatrix(self.current_weight().to(W0.device, W0.dtype))

    def update(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The dense update ``dW = W_now - W0``."""
        return self.current_weight().to(device, dtype) - self.pretrained.to(device, dtype)

    def update_singular_values(self, device: torch.device) -> Tensor:
        """All singular values of ``dW``, exactly, by a float64 LAPACK SVD (``svdvals``).

        ``dW`` of a full fine-tune is full-rank, so no low-rank shortcut applies; the effective rank depends on the
        whole spectrum. Cost: O(m n min(m, n)); ``effective_rank_method="estimate"`` avoids it (docs/full-finetuning.md).
        """
        return torch.linalg.svdvals(self.update(device, torch.float64))

    def copy_bytes(self) -> int:
        return 0 if self.pretrained.is_meta else self.pretrained.numel() * self.pretrained.element_size()


def find_dense_matrices(
    model: nn.Module,
    include: str | None,
    exclude: str | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep: Keep | None = None,
) -> list[DenseMatrix]:
    """Every ``Linear``/``Conv1D``/``Embedding``/conv layer whose module path matches ``include`` and not
    ``exclude``, with a copy of its current (pretrained) weight taken now (and handed to ``keep`` one at a time,
    so spilling to disk never holds more than one extra copy in memory)."""
    return [
        DenseMatrix.snapshot_of(name, module, dtype, device, keep)
        for name, module in dense_layers(model, include, exclude)
    ]


def dense_layers(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> list[tuple[str, nn.Module]]:
    """``(module path, module)`` of every plain layer full mode can monitor, filtered by the regexes; reads no
    weight (so it never gathers a shard)."""
    return [(name, m) for name, m in model.named_modules() if _is_dense_layer(m) and selected(name, include, exclude)]
