"""Model adapter: find the PEFT LoRA layers of a model and express each merged weight as an operator.

This is the only module that knows PEFT's internals. Everything below it (``linalg``, ``metrics``) sees plain
tensors in the ``(out_features, in_features)`` convention.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .linalg import LowRankUpdatedMatrix

logger = logging.getLogger(__name__)

__all__ = ["MonitoredMatrix", "CapturedMatrix", "find_lora_matrices", "describe_skipped", "readable_name"]

_PEFT_PREFIXES = ("base_model.model.", "base_model.")


def readable_name(module_path: str) -> str:
    """Module path without PEFT's wrapper prefixes (``base_model.model.``)."""
    for prefix in _PEFT_PREFIXES:
        if module_path.startswith(prefix):
            return module_path[len(prefix) :]
    return module_path


@dataclass
class MonitoredMatrix:
    """One PEFT ``lora.Linear`` layer: its frozen base weight plus the sum of its active, unmerged adapters."""

    name: str
    module: nn.Module

    @property
    def adapters(self) -> list[str]:
        merged = set(getattr(self.module, "merged_adapters", ()))
        return [a for a in self.module.active_adapters if a in self.module.lora_A and a not in merged]

    def base_weight(self) -> Tensor:
        """Pretrained weight in (out, in) layout; GPT-2's ``Conv1D`` stores (in, out) (``fan_in_fan_out``)."""
        W = self.module.get_base_layer().weight
        return W.T if self.module.fan_in_fan_out else W

    def is_dora(self) -> bool:
        return any(a in self.module.lora_magnitude_vector for a in self.adapters)

    def update_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(B, A)`` with ``B @ A`` = the summed update of all active adapters, LoRA scaling folded into B.

        Stacking adapters side by side (``[s1 B1, s2 B2] @ [A1; A2]``) keeps the update low-rank and exact;
        ``module.scaling`` already reflects ``alpha/r``, rsLoRA's ``alpha/sqrt(r)`` and rank/alpha patterns.
        """
        return stack_factors(self.adapter_weights(), dtype, device)

    def adapter_weights(self) -> list[tuple[Tensor, Tensor, float]]:
        """``(B, A, scaling)`` of each active adapter, as stored (live parameters, not copies)."""
        return [(self.module.lora_B[a].weight, self.module.lora_A[a].weight, self.module.scaling[a]) for a in self.adapters]

    def dora_magnitude(self) -> Tensor | None:
        """DoRA's per-row magnitude vector ``m``, or None for plain LoRA."""
        if not self.is_dora():
            return None
        (adapter,) = self.adapters  # checked by find_lora_matrices
        return self.module.lora_magnitude_vector[adapter].weight

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        """The merged weight around a given copy of the base weight (already in the compute dtype/device)."""
        return merged_operator(W0, self.update_factors(W0.dtype, W0.device), self.dora_magnitude())

    @torch.no_grad()
    def capture(self) -> CapturedMatrix:
        """A frozen copy of what a measurement reads, for measuring later (e.g. in a background thread).

        Copies the small trainable parts (LoRA factors, DoRA magnitude: O((m+n) r)). The base weight is read
        live when it is frozen (``requires_grad=False``, as under LoRA: nothing changes it), else copied too.
        """
        magnitude = self.dora_magnitude()
        base = self.base_weight()
        return CapturedMatrix(
            self.name,
            self,
            [(B.detach().clone(), A.detach().clone(), s) for B, A, s in self.adapter_weights()],
            None if magnitude is None else magnitude.detach().clone(),
            base.detach().clone() if base.requires_grad else None,
        )


@dataclass
class CapturedMatrix:
    """The state of a :class:`MonitoredMatrix` at one step, with the same measuring interface."""

    name: str
    live: MonitoredMatrix
    weights: list[tuple[Tensor, Tensor, float]]  # copies of each active adapter's (B, A, scaling)
    magnitude: Tensor | None
    base: Tensor | None  # a copy when the live base weight was trainable, else None (read live)

    def base_weight(self) -> Tensor:
        return self.live.base_weight() if self.base is None else self.base

    def update_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        return stack_factors(self.weights, dtype, device)

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        return merged_operator(W0, self.update_factors(W0.dtype, W0.device), self.magnitude)


def stack_factors(weights: list[tuple[Tensor, Tensor, float]], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """``(B, A)`` with ``B @ A = sum_a s_a B_a A_a``: adapters stacked side by side, scaling folded into B."""
    if not weights:
        return None
    B = torch.cat([B.to(device, dtype) * s for B, _, s in weights], dim=1)
    A = torch.cat([A.to(device, dtype) for _, A, _ in weights], dim=0)
    return B, A


def merged_operator(W0: Tensor, factors: tuple[Tensor, Tensor] | None, magnitude: Tensor | None) -> LowRankUpdatedMatrix:
    """``W0 + B A`` as an operator, with DoRA's row rescaling when ``magnitude`` is given.

    DoRA (Liu et al. 2024) rescales each output row: ``m * (W0 + dW) / ||W0 + dW||_row``; the row norms are
    computed from the factors in O(mnr) without forming ``W0 + dW``.
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


def _unsupported_reason(module: nn.Module) -> str | None:
    from peft.tuners.lora import Linear

    if not isinstance(module, Linear):
        return f"layer type {type(module).__name__}"
    weight = getattr(module.get_base_layer(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return f"base weight {type(weight).__name__} (quantized or not a matrix)"
    active = [a for a in module.active_adapters if a in module.lora_A]
    variants = getattr(module, "lora_variant", {})
    for a in active:
        variant = variants.get(a)
        if variant is not None and a not in module.lora_magnitude_vector:
            return f"LoRA variant {type(variant).__name__}"
    if any(a in module.lora_magnitude_vector for a in active) and len(active) > 1:
        return "DoRA with several active adapters"
    return None


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
        if (include and not re.search(include, name)) or (exclude and re.search(exclude, name)):
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
