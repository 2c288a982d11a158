"""Model adapter for PEFT tuners other than LoRA: each layer's merged weight as an operator, against its frozen
base weight (the pretrained one: none of these tuners rewrites the base), in the (out, in) layout of :mod:`.layers`.

Tuners whose update is low-rank are expressed as factors ``B A``, so the solver and the exact r x r effective
rank of LoRA apply unchanged (:class:`~.layers.MonitoredMatrix` with other ``adapter_weights``; the factors are
formed in float64, where the product of two stored values is exact):

- AdaLoRA (Zhang et al. 2023, ``SVDLinear``/``SVDConv2d``): PEFT's ``get_delta_weight`` is
  ``B (A * E) * scaling / (ranknum + 1e-5)``, i.e. factors ``B`` and ``A * E`` (E: the pruned singular values).
- VeRA (Kopiczko et al. 2024): ``diag(lambda_b) B_shared[:out] diag(lambda_d) A_shared[:, :in]``, i.e. factors
  ``lambda_b * B`` and ``lambda_d * A``.
- LoHa (Hyeon-Woo et al. 2022, FedPara): ``(W1a W1b) * (W2a W2b) * scaling`` (Hadamard product). A Hadamard
  product of two products is one product of Khatri-Rao factors: row i of ``B`` is ``W1a[i] (x) W2a[i]`` and column
  j of ``A`` is ``W1b[:, j] (x) W2b[:, j]``, rank <= r1 r2, exact.

Every other tuner layer that PEFT can merge (LoKr, IA3, OFT, BOFT, HRA, FourierFT, LoHa with ``use_effective_conv2d``
...; multiplicative ones included) gets an exact dense fallback, :class:`MergedMatrix`: its merged weight is PEFT's
own ``merge()`` applied to a private float64 copy of the layer, and its effective rank comes from all singular values
of the dense update. Quantized or sharded bases are refused there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .layers import MonitoredMatrix, unmerged_active_adapters
from .layout import is_matrix_layer, matrix_shape, weight_matrix
from .linalg import LowRankUpdatedMatrix
from .metrics import effective_rank
from .quantized import is_quantized
from .sharding import full, module_is_sharded

__all__ = ["AdaLoraMatrix", "VeraMatrix", "LoHaMatrix", "MergedMatrix", "tuner_matrix", "merged_weight"]


def _f64(t: Tensor) -> Tensor:
    return full(t).double()


class AdaLoraMatrix(MonitoredMatrix):
    """An AdaLoRA layer: factors ``B`` and ``A * E``, scaling ``scaling / (ranknum + 1e-5)`` as in PEFT."""

    def adapter_weights(self) -> list[tuple[Tensor, Tensor, float]]:
        m: Any = self.module
        return [
            (full(m.lora_B[a]), _f64(m.lora_A[a]) * _f64(m.lora_E[a]), m.scaling[a] / (float(m.ranknum[a]) + 1e-5))
            for a in self.adapters
        ]


class VeraMatrix(MonitoredMatrix):
    """A VeRA layer: the shared frozen projections sliced to this layer, scaled by its trained vectors."""

    def adapter_weights(self) -> list[tuple[Tensor, Tensor, float]]:
        m: Any = self.module
        terms = []
        for a in self.adapters:
            lambda_b, lambda_d = _f64(m.vera_lambda_b[a]), _f64(m.vera_lambda_d[a])
            B = _f64(m.vera_B[a])[: m.out_features].to(lambda_b.device) * lambda_b[:, None]
            A = _f64(m.vera_A[a])[:, : m.in_features].to(lambda_d.device) * lambda_d[:, None]
            terms.append((B, A, 1.0))
        return terms


class LoHaMatrix(MonitoredMatrix):
    """A LoHa layer (Linear, or conv without the CP kernel): the Hadamard product as Khatri-Rao factors."""

    def adapter_weights(self) -> list[tuple[Tensor, Tensor, float]]:
        m: Any = self.module
        terms = []
        for a in self.adapters:
            w1a, w1b, w2a, w2b = (_f64(getattr(m, f"hada_{part}")[a]) for part in ("w1_a", "w1_b", "w2_a", "w2_b"))
            B = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)  # (out, r1 r2): row-wise Kronecker products
            A = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)  # (r1 r2, in): column-wise Kronecker products
            terms.append((B, A, m.scaling[a]))
        return terms


@torch.no_grad()
def merged_weight(module: Any) -> Tensor:
    """The layer's merged weight in float64, (out, in) layout: PEFT's own ``merge`` of the active, unmerged adapters
    applied to a private copy (the live layer is untouched; the copy of the base weight is the only large one)."""
    if module_is_sharded(module):
        raise ValueError(f"the dense fallback for {type(module).__name__} layers cannot read sharded weights")
    weight = module.get_base_layer().weight
    own = nn.Parameter(weight.detach().to(torch.float64, copy=True), requires_grad=False)
    clone = copy.deepcopy(module, {id(weight): own}).to(torch.float64)
    clone.merge(adapter_names=unmerged_active_adapters(module))
    return weight_matrix(clone.get_base_layer())


@dataclass
class MergedMatrix:
    """A tuner layer measured densely against its frozen base weight (read live, never copied): the merged weight
    is :func:`merged_weight`. ``state``, set by :meth:`capture`, is a copy of the layer's adapters sharing the live
    base weight (or copying it when it is trainable), merged when measured."""

    name: str
    module: Any  # a PEFT BaseTunerLayer (an nn.Module)
    state: Any = None

    def base_weight(self) -> Tensor:
        return weight_matrix(self.module.get_base_layer())

    def shape(self) -> torch.Size:
        return matrix_shape(self.module.get_base_layer())

    def current_weight(self) -> Tensor:
        return merged_weight(self.module if self.state is None else self.state)

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        """The merged weight as a dense operator, in ``W0``'s dtype and device."""
        return LowRankUpdatedMatrix(self.current_weight().to(W0.device, W0.dtype))

    def update_singular_values(self, device: torch.device) -> Tensor:
        """All singular values of the dense update ``merged - base``, in float64 (the merge itself was float64)."""
        return torch.linalg.svdvals(self.current_weight().to(device) - self.base_weight().to(device, torch.float64))

    def update_effective_rank(self, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> float:
        """Exact, from all singular values of the dense update (``dtype`` and ``generator`` are not used)."""
        return effective_rank(self.update_singular_values(device))

    @torch.no_grad()
    def capture(self) -> MergedMatrix:
        """This layer's adapters as they are now: O(adapter size), the frozen base weight is shared."""
        if self.state is not None:  # already a frozen copy
            return self
        weight = self.module.get_base_layer().weight
        return replace(self, state=copy.deepcopy(self.module, {} if weight.requires_grad else {id(weight): weight}))


def tuner_matrix(name: str, module: Any) -> tuple[MonitoredMatrix | MergedMatrix | None, str | None]:
    """The matrix object for a non-LoRA PEFT tuner layer, or None and why it cannot be measured."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.vera import VeraLayer

    kind = type(module).__name__
    tuner = type(module).__module__.split(".")[2] if type(module).__module__.startswith("peft.tuners.") else kind
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    if base is None or not is_matrix_layer(base) or not isinstance(getattr(base, "weight", None), Tensor):
        return None, f"{tuner} layer {kind} on a {type(base).__name__} (not a Linear/Conv1D/Embedding/conv weight)"
    low_rank = [(AdaLoraLayer, AdaLoraMatrix), (VeraLayer, VeraMatrix), (LoHaLayer, LoHaMatrix)]
    factored = next((matrix for layer, matrix in low_rank if isinstance(module, layer)), None)
    if factored is not None and not getattr(module, "hada_t1", None):  # LoHa's CP conv kernel is not factored
        return factored(name, module), None
    if is_quantized(base.weight, base):
        return None, f"{tuner} layer {kind} on a quantized base (its dense fallback merges a float64 copy)"
    if not callable(getattr(module, "merge", None)):
        return None, f"{tuner} layer {kind} cannot be merged"
    return MergedMatrix(name, module), None
