"""Full fine-tuning mode: monitor plain weight matrices (no PEFT) against a copy of their pretrained values.

This is the comparison Shuttleworth et al. 2024 make between LoRA and full fine-tuning. Nothing is frozen, so
the pretrained weight must be *copied* before training moves it: one copy of every monitored matrix, in
``weight_copy_dtype`` (float32: 4 bytes per parameter; float16: 2) on ``basis_device`` (CPU by default; "disk":
safetensors files, memory-mapped, see :meth:`.basis_store.BasisStore.disk_copy`). The
merged weight is simply the current weight, a dense matrix (the solver's low-rank "update" part is absent); the
monitor warm-starts its iterations from the pretrained top singular vectors as usual.

A :class:`DenseMatrix` implements the :class:`~.matrix.WeightMatrix` interface like a LoRA layer does; which
layers are monitored is decided in :mod:`.discovery`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .layout import weight_matrix
from .linalg import LowRankUpdatedMatrix
from .metrics import effective_rank, estimate_effective_rank
from .sharding import module_is_sharded

__all__ = ["DenseMatrix", "Keep"]


Keep = Callable[[Tensor], Tensor]  # where a copy is kept, e.g. BasisStore.disk_copy (the copy -> its stored form)


@dataclass
class DenseMatrix:
    """One fully fine-tuned layer: a stored copy of its pretrained weight and the live module."""

    name: str
    module: nn.Module
    pretrained: Tensor  # (out, in) copy taken before training
    frozen: Tensor | None = None  # set by capture(): the weight at that step, measured instead of the live one
    rank_method: str = "exact"  # effective rank of the update: "exact" or "estimate" (SpectralConfig)

    @classmethod
    def snapshot_of(
        cls,
        name: str,
        module: nn.Module,
        dtype: torch.dtype,
        device: str | torch.device,
        keep: Keep | None = None,
        rank_method: str = "exact",
    ) -> DenseMatrix:
        with torch.no_grad():
            copy = weight_matrix(module).detach().to(device=device, dtype=dtype, copy=True).contiguous()
        return cls(name, module, copy if keep is None else keep(copy), rank_method=rank_method)

    def base_weight(self) -> Tensor:
        """The pretrained copy (not the live weight): the snapshot basis is always the pretrained one."""
        return self.pretrained

    def shape(self) -> torch.Size:
        """The pretrained copy's shape (kept, as a meta tensor, also where the copy itself is not)."""
        return self.pretrained.shape

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

    def update_effective_rank(self, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> float:
        """Exact from all singular values, or the deflated stochastic Lanczos estimate of the update in ``dtype``
        (``rank_method="estimate"``, faster on large matrices; error measured in docs/full-finetuning.md)."""
        if self.rank_method == "estimate":
            return estimate_effective_rank(self.update(device, dtype), generator=generator)
        return effective_rank(self.update_singular_values(device))

    def copy_bytes(self) -> int:
        return 0 if self.pretrained.is_meta else self.pretrained.numel() * self.pretrained.element_size()
