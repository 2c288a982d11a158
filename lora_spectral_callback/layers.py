"""Model adapter: find the PEFT LoRA layers of a model and express each merged weight as an operator.

This is the only module that knows PEFT's internals. Everything below it (``linalg``, ``metrics``) sees plain
tensors in the ``(out_features, in_features)`` convention, so every layer kind is first laid out as the matrix
of the linear map it applies (left singular vectors live in its output space):

- ``lora.Linear``: the weight as stored, ``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)`` and is transposed.
- ``lora.Embedding``: the transposed table, ``(embedding_dim, num_embeddings)``. A lookup maps a one-hot token
  to a row of the table, i.e. applies ``weight.T``; PEFT's own update ``lora_embedding_B @ lora_embedding_A`` has
  exactly this shape (``get_delta_weight`` transposes it back to the table layout).
- ``lora.Conv1d/Conv2d/Conv3d``: the kernel flattened to ``(out_channels, in_channels * prod(kernel_size))``.
  PEFT's ``lora_B`` is a 1x1 conv, so the merged kernel ``W0 + s * conv(A, B)`` flattens to
  ``W0_flat + s * B_flat @ A_flat`` exactly, and DoRA's per-output-channel norm is a row norm of that matrix.
- ``target_parameters`` (``ParamWrapper``) on a 2-D parameter: the parameter as stored, like ``nn.Linear.weight``
  (PEFT's own delta is ``B @ A`` in that layout); 3-D expert tensors are not supported.
- Quantized bases (bitsandbytes 4/8-bit) are dequantized with PEFT's ``dequantize_module_weight``.
- FSDP2 ``DTensor`` shards and DeepSpeed ZeRO-3 partitions are gathered when read (:func:`.sharding.full`, a
  collective).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .linalg import LowRankUpdatedMatrix
from .metrics import low_rank_singular_values
from .sharding import full, logical_shape, module_is_sharded

logger = logging.getLogger(__name__)

__all__ = [
    "MonitoredMatrix",
    "CapturedMatrix",
    "find_lora_matrices",
    "has_peft_layers",
    "describe_skipped",
    "readable_name",
    "selected",
]

_PEFT_PREFIXES = ("base_model.model.", "base_model.")


def readable_name(module_path: str) -> str:
    """Module path without PEFT's wrapper segments (``base_model.model.``), also where a PeftModel sits inside a
    larger module (``encoder.base_model.model.layer.0`` -> ``encoder.layer.0``)."""
    name = module_path.replace("." + _PEFT_PREFIXES[0], ".")
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass
class MonitoredMatrix:
    """One PEFT LoRA layer (Linear, Embedding or ConvNd, see the module docstring for the matrix layout): its
    frozen base weight plus the sum of its active, unmerged adapters."""

    name: str
    module: nn.Module

    @property
    def is_embedding(self) -> bool:
        return bool(getattr(self.module, "lora_embedding_A", None))

    @property
    def adapters(self) -> list[str]:
        merged = set(getattr(self.module, "merged_adapters", ()))
        return [a for a in self.module.active_adapters if a in _adapter_names(self.module) and a not in merged]

    def base_weight(self) -> Tensor:
        """Pretrained weight in (out, in) layout (see the module docstring), dequantized if the base is quantized."""
        from peft.utils.integrations import dequantize_module_weight

        if hasattr(self.module, "get_param"):  # target_parameters (ParamWrapper): a 2-D parameter, used as stored
            return full(self.module.get_param())
        base = self.module.get_base_layer()
        W = full(base.weight) if base.weight.is_floating_point() else dequantize_module_weight(base)
        if self.is_embedding or getattr(self.module, "fan_in_fan_out", False):
            return W.T
        return W.flatten(1)  # a no-op for Linear; ConvNd kernels -> (out_channels, in_channels * kernel volume)

    def adapter_factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """One adapter's unscaled ``(B, A)`` in the (out, in) layout: ``B @ A`` is its update before scaling."""
        if self.is_embedding:
            return full(self.module.lora_embedding_B[adapter]), full(self.module.lora_embedding_A[adapter])
        return full(self.module.lora_B[adapter].weight).flatten(1), full(self.module.lora_A[adapter].weight).flatten(1)

    def is_dora(self) -> bool:
        return any(a in self.module.lora_magnitude_vector for a in self.adapters)

    def update_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(B, A)`` with ``B @ A`` = the summed update of all active adapters, LoRA scaling folded into B.

        Stacking adapters side by side (``[s1 B1, s2 B2] @ [A1; A2]``) keeps the update low-rank and exact;
        ``module.scaling`` already reflects ``alpha/r``, rsLoRA's ``alpha/sqrt(r)`` and rank/alpha patterns.
        """
        return stack_factors(self.adapter_weights(), dtype, device)

    def adapter_weights(self) -> list[tuple[Tensor, Tensor, float]]:
        """``(B, A, scaling)`` of each active adapter in the (out, in) layout (live parameters, not copies)."""
        return [(*self.adapter_factors(a), self.module.scaling[a]) for a in self.adapters]

    def dora_magnitude(self) -> Tensor | None:
        """DoRA's per-row magnitude vector ``m`` (flattened: a conv stores it as ``(1, out, 1, ...)``), or None."""
        if not self.is_dora():
            return None
        (adapter,) = self.adapters  # checked by find_lora_matrices
        return full(self.module.lora_magnitude_vector[adapter].weight).reshape(-1)

    def update_singular_values(self, device: torch.device) -> Tensor | None:
        """Exact non-zero singular values of the summed update ``B @ A`` (float64, from the factors)."""
        factors = self.update_factors(torch.float64, device)
        return low_rank_singular_values(*factors) if factors else None

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        """The merged weight around a given copy of the base weight (already in the compute dtype/device)."""
        return merged_operator(W0, self.update_factors(W0.dtype, W0.device), self.dora_magnitude())

    @torch.no_grad()
    def capture(self) -> CapturedMatrix:
        """A frozen copy of what a measurement reads, for measuring later (e.g. in a background thread).

        Copies the small trainable parts (LoRA factors, DoRA magnitude: O((m+n) r)). The base weight is read
        live when it is frozen (``requires_grad=False``, as under LoRA: nothing changes it), else copied too; so
        is a sharded one, whose gather is a collective that only a ``capture`` on every rank may do.
        """
        sharded = module_is_sharded(self.module)
        # a gathered tensor is already a private copy; in a partly sharded module the unsharded ones stay live,
        # which is harmless because a sharded model is measured right away (never in the background)
        own = (lambda t: t.detach()) if sharded else (lambda t: t.detach().clone())
        magnitude = self.dora_magnitude()
        base = self.base_weight()
        return CapturedMatrix(
            self.name,
            self,
            [(own(B), own(A), s) for B, A, s in self.adapter_weights()],
            None if magnitude is None else own(magnitude),
            own(base) if base.requires_grad or sharded else None,
        )


@dataclass
class CapturedMatrix:
    """The state of a :class:`MonitoredMatrix` at one step, with the same measuring interface."""

    name: str
    live: MonitoredMatrix
    weights: list[tuple[Tensor, Tensor, float]]  # copies of each active adapter's (B, A, scaling)
    magnitude: Tensor | None
    base: Tensor | None  # a copy when the live base weight was trainable, else None (read live)

    @property
    def module(self) -> nn.Module:
        return self.live.module

    def base_weight(self) -> Tensor:
        return self.live.base_weight() if self.base is None else self.base

    def update_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        return stack_factors(self.weights, dtype, device)

    update_singular_values = MonitoredMatrix.update_singular_values  # same computation on the copied factors

    def capture(self) -> CapturedMatrix:
        """Already a frozen copy."""
        return self

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        return merged_operator(W0, self.update_factors(W0.dtype, W0.device), self.magnitude)


def stack_factors(
    weights: list[tuple[Tensor, Tensor, float]], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    """``(B, A)`` with ``B @ A = sum_a s_a B_a A_a``: adapters stacked side by side, scaling folded into B."""
    if not weights:
        return None
    B = torch.cat([B.to(device, dtype) * s for B, _, s in weights], dim=1)
    A = torch.cat([A.to(device, dtype) for _, A, _ in weights], dim=0)
    return B, A


def merged_operator(
    W0: Tensor, factors: tuple[Tensor, Tensor] | None, magnitude: Tensor | None
) -> LowRankUpdatedMatrix:
    """``W0 + B A`` as an operator, with DoRA's row rescaling when ``magnitude`` is given.

    DoRA (Liu et al. 2024) rescales each output row: ``m * (W0 + dW) / ||W0 + dW||_row``; the row norms are
    computed from the factors in O(mnr) without forming ``W0 + dW``. For a conv the norm runs over a whole output
    filter, i.e. a row of the flattened kernel.
    """
    if factors is None:
        return LowRankUpdatedMatrix(W0)
    B, A = factors
    row_scale = None
    if magnitude is not None:
        magnitude = magnitude.to(W0.device, W0.dtype)
        BA_rows = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||(B A)_i||^2
        cross = ((W0 @ A.T) * B).sum(dim=1)  # <W0_i, (B A)_i>
        norms = ((W0 * W0).sum(dim=1) + 2 * cross + BA_rows).clamp_min(0).sqrt()
        row_scale = magnitude / norms
    return LowRankUpdatedMatrix(W0, B, A, row_scale)


def _adapter_names(module: nn.Module) -> set[str]:
    return set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}))


def _unsupported_reason(module: nn.Module) -> str | None:
    from peft.tuners.lora import Embedding, Linear, ParamWrapper
    from peft.tuners.lora.layer import _ConvNd

    if not hasattr(module, "get_base_layer"):
        return f"layer type {type(module).__name__}"
    base = module.get_base_layer()
    if isinstance(module, ParamWrapper):
        if module.num_experts != 1 or len(logical_shape(module.get_param())) != 2:
            return "target_parameters on a 3-D (expert) parameter"
        return "DoRA/variant on target_parameters" if getattr(module, "lora_variant", {}) else None
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"base weight {type(weight).__name__}"
    is_conv = isinstance(module, _ConvNd)
    # PEFT's bitsandbytes/HQQ/... layers are LoraLayers with lora_A/lora_B like lora.Linear but other classes.
    if not (
        isinstance(module, (Linear, Embedding)) or is_conv or isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
    ):
        return f"layer type {type(module).__name__}"
    if is_conv and base.groups != 1:
        return "grouped convolution (PEFT cannot merge it either)"
    if not is_conv and weight.is_floating_point() and len(logical_shape(weight)) != 2:
        return f"base weight of shape {tuple(logical_shape(weight))}"
    active = [a for a in module.active_adapters if a in _adapter_names(module)]
    variants = getattr(module, "lora_variant", {})
    for a in active:
        variant = variants.get(a)
        if variant is not None and a not in module.lora_magnitude_vector:
            return f"LoRA variant {type(variant).__name__}"
    if any(a in module.lora_magnitude_vector for a in active):
        if len(active) > 1:
            return "DoRA with several active adapters"
        if isinstance(module, Embedding):
            return "DoRA on an Embedding"
    return None


def selected(name: str, include: str | None, exclude: str | None) -> bool:
    """Whether a layer name passes the ``include`` / ``exclude`` regexes (both modes filter with this)."""
    return not (include and not re.search(include, name)) and not (exclude and re.search(exclude, name))


def has_peft_layers(model: nn.Module) -> bool:
    """Whether PEFT has put any adapter layer (LoRA or another tuner) into ``model``; decides ``mode="auto"``, so
    that a LoHa/VeRA/... model is refused in LoRA mode rather than measured as an unchanging "full" fine-tune."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def find_lora_matrices(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> tuple[list[MonitoredMatrix], dict[str, str]]:
    """All PEFT LoRA layers of ``model`` whose readable name matches ``include`` and not ``exclude`` (regexes).

    Returns the monitorable matrices and ``{name: reason}`` for LoRA layers this version cannot measure yet, so
    the caller can warn about them rather than drop them silently.
    """
    from peft.tuners.lora import LoraLayer

    found: list[MonitoredMatrix] = []
    skipped: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = readable_name(path)
        if not selected(name, include, exclude):
            continue
        reason = _unsupported_reason(module)
        if reason is None:
            found.append(MonitoredMatrix(name, module))
        else:
            skipped[name] = reason
    return found, skipped


def describe_skipped(skipped: dict[str, str], limit: int = 8) -> str:
    """One readable line listing layers that will not be monitored, grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
        parts.append(f"{reason}: {shown}")
    return "; ".join(parts)
