"""The interface between the monitor and the model adapters: what one monitored weight matrix must offer.

Every kind of monitored layer (a PEFT LoRA layer in :mod:`.layers`, a fully fine-tuned layer in
:mod:`.full_finetune`, and their frozen copies for background measurement) is laid out as the matrix of the linear
map it applies, ``(out_features, in_features)``, so that left singular vectors live in its output space. The monitor
only ever talks to it through this protocol, which keeps it free of PEFT and layer-kind details.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from .linalg import LowRankUpdatedMatrix

__all__ = ["WeightMatrix"]


class WeightMatrix(Protocol):
    """One monitored weight: its pretrained reference, its current merged form and its update.

    ``base_weight()`` is the reference the paper compares against: the *pretrained* weight, whatever the layer
    stores. ``operator(W0)`` is the current merged weight built around a copy of that reference already in the
    compute dtype and device (so the monitor controls precision and placement), and ``update_effective_rank`` the
    effective rank of ``merged - reference``. ``capture()`` freezes what a measurement reads, so
    it can run later (in a background thread) on the state of the step it describes.
    """

    @property
    def name(self) -> str:
        """Readable module path (PEFT's wrapper segments removed): the layer's key in reports and tags."""
        ...

    @property
    def module(self) -> nn.Module:
        """The live module, to tell whether it is still part of the model."""
        ...

    def base_weight(self) -> Tensor: ...

    def shape(self) -> torch.Size:
        """``(out, in)`` of the reference, read without gathering a shard or dequantizing: what the work split
        across ranks is balanced by."""
        ...

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix: ...

    def update_effective_rank(self, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> float:
        """Effective rank of ``merged - reference`` (0 for a zero update); ``dtype`` and ``generator`` serve a layer
        that estimates it rather than computing all singular values."""
        ...

    def capture(self) -> WeightMatrix: ...
