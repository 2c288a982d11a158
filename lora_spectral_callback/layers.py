"""Model adapter: one PEFT LoRA layer as a monitored matrix, its merged weight expressed as an operator.

Everything below it (``linalg``, ``metrics``) sees plain
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
- Quantized bases (bitsandbytes 4/8-bit, whatever the 4-bit storage dtype) are recognised by their quantization
  state and dequantized (:mod:`.quantized`).
- FSDP2 ``DTensor`` shards and DeepSpeed ZeRO-3 partitions are gathered when read (:func:`.sharding.full`, a
  collective).

The reference a merged weight is compared with is the true pretrained weight ``W0`` (Shuttleworth et al. 2024
compare with the pretrained model). Usually that is the frozen base weight. Inits that rewrite the base
(``init_lora_weights`` = ``"pissa"``/``"pissa_niter_*"``, ``"olora"``, ``"corda"``, ``"loftq"``, ``"lora_ga"``:
PEFT's ``pissa_init``/``olora_init``/... store ``W_res = W0 - s B0 A0`` as the base) are read from the PEFT config,
and the initial factors ``(s B0, A0)`` of such an adapter are copied when the layer is found, so that
``W0 = W_res + s B0 A0`` and ``merged - W0 = [s B, -s B0] [A; A0]``: still low-rank (rank <= 2r) and exact. (For
LoftQ, ``W_res`` is the quantized weight and ``W_res + s B0 A0`` is LoftQ's approximation of ``W0``, which is what
the model computes before training; the true ``W0`` is not kept by PEFT.) The copy is only right if the adapter has
not been trained yet: see :meth:`MonitoredMatrix.restore_initial` and :mod:`.inits` for a monitor created later
and for the check that catches it for PiSSA and OLoRA.

Other PEFT tuners are adapted in :mod:`.tuners`; which layers are monitored is decided in :mod:`.discovery`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layout import laid_out_shape
from .linalg import LowRankUpdatedMatrix
from .merged import merged_operator, stack_factors
from .metrics import effective_rank, low_rank_singular_values
from .quantized import dequantized, is_quantized, weight_shape
from .sharding import full, module_is_sharded

__all__ = ["CapturedMatrix", "MonitoredMatrix", "adapter_names", "readable_name", "unmerged_active_adapters"]


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
    reference weight (the pretrained ``W0``) and the merged weight, base plus the sum of its active, unmerged
    adapters.

    ``initial`` holds ``(s B0, A0)`` of every adapter whose init rewrote the base (see the module docstring);
    ``initial_unknown`` says why they cannot be known (the adapter was trained before the layer was found), in
    which case every measurement of this layer fails with that message rather than use a wrong reference.
    """

    name: str
    module: Any  # a PEFT LoraLayer; as an nn.Module, torch's stubs would type its adapter dicts Tensor | Module
    initial: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    initial_unknown: str | None = None

    @property
    def is_embedding(self) -> bool:
        return bool(getattr(self.module, "lora_embedding_A", None))

    @property
    def adapters(self) -> list[str]:
        return unmerged_active_adapters(self.module)

    def stored_weight(self) -> Tensor:
        """The base layer's weight as it is now, in (out, in) layout, dequantized if the base is quantized: the
        pretrained weight, or ``W_res`` after a base-rewriting init."""
        if hasattr(self.module, "get_param"):  # target_parameters (ParamWrapper): a 2-D parameter, used as stored
            return full(self.module.get_param())
        base = self.module.get_base_layer()
        W = dequantized(base) if is_quantized(base.weight, base) else full(base.weight)
        if self._stored_transposed():
            return W.T
        return W.flatten(1)  # a no-op for Linear; ConvNd kernels -> (out_channels, in_channels * kernel volume)

    def base_weight(self) -> Tensor:
        """The reference: the pretrained weight in (out, in) layout (``W_res + sum s B0 A0`` after a base-rewriting
        init, computed in at least float32)."""
        return self._reference(self.stored_weight())

    def shape(self) -> torch.Size:
        """The reference's ``(out, in)`` shape, read without gathering or dequantizing the base."""
        stored = weight_shape(self._base_param(), self._base_owner())
        return laid_out_shape(stored, self._stored_transposed())

    def _stored_transposed(self) -> bool:
        if hasattr(self.module, "get_param"):  # a 2-D parameter, used as stored
            return False
        return self.is_embedding or bool(getattr(self.module, "fan_in_fan_out", False))

    def _reference(self, stored: Tensor) -> Tensor:
        if self.initial_unknown is not None:
            raise ValueError(self.initial_unknown)
        if not self.initial:
            return stored
        dtype = torch.promote_types(stored.dtype, torch.float32)
        W0 = stored.to(dtype, copy=True)
        for sB0, A0 in self.initial.values():
            W0.addmm_(sB0.to(W0.device, dtype), A0.to(W0.device, dtype))
        return W0

    def adapter_factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """One adapter's unscaled ``(B, A)`` in the (out, in) layout: ``B @ A`` is its update before scaling."""
        if self.is_embedding:
            return full(self.module.lora_embedding_B[adapter]), full(self.module.lora_embedding_A[adapter])
        return full(self.module.lora_B[adapter].weight).flatten(1), full(self.module.lora_A[adapter].weight).flatten(1)

    def is_dora(self) -> bool:
        return any(a in getattr(self.module, "lora_magnitude_vector", ()) for a in self.adapters)

    def update_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(B, A)`` with ``B @ A`` = merged weight minus reference, scalings folded into B.

        Stacking terms side by side (``[s1 B1, s2 B2, -s B0] @ [A1; A2; A0]``) keeps the update low-rank and exact;
        ``module.scaling`` already reflects ``alpha/r``, rsLoRA's ``alpha/sqrt(r)`` and rank/alpha patterns.
        """
        return stack_factors(self.update_terms(), dtype, device)

    def adapter_weights(self) -> list[tuple[Tensor, Tensor, float]]:
        """``(B, A, scaling)`` of each active adapter in the (out, in) layout (live parameters, not copies)."""
        return [(*self.adapter_factors(a), self.module.scaling[a]) for a in self.adapters]

    def update_terms(self) -> list[tuple[Tensor, Tensor, float]]:
        """``(B, A, scaling)`` terms summing to merged minus reference: the active adapters, and minus the initial
        product of every adapter whose init rewrote the base (active or not: the base was rewritten either way)."""
        return self.adapter_weights() + [(sB0, A0, -1.0) for sB0, A0 in self.initial.values()]

    def dora_magnitude(self) -> Tensor | None:
        """DoRA's per-row magnitude vector ``m`` (flattened: a conv stores it as ``(1, out, 1, ...)``), or None."""
        if not self.is_dora():
            return None
        (adapter,) = self.adapters  # checked by find_lora_matrices
        return full(self.module.lora_magnitude_vector[adapter].weight).reshape(-1)

    def update_singular_values(self, device: torch.device) -> Tensor | None:
        """Exact non-zero singular values of the update ``merged - reference`` (float64, from the factors)."""
        factors = self.update_factors(torch.float64, device)
        return low_rank_singular_values(*factors) if factors else None

    def update_effective_rank(self, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> float:
        """Exact effective rank of the update from its r x r SVD (nothing to estimate: ``dtype`` and ``generator``
        are not used)."""
        singular_values = self.update_singular_values(device)
        return effective_rank(singular_values) if singular_values is not None else 0.0

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        """The merged weight around a given copy of the reference weight (already in the compute dtype/device)."""
        return merged_operator(W0, self.update_factors(W0.dtype, W0.device), self.dora_magnitude())

    def initial_state(self) -> dict[str, Tensor]:
        """The initial factors as flat tensors (``"<adapter>.B"`` = ``s B0``, ``"<adapter>.A"`` = ``A0``): what a
        resumed run needs to rebuild the reference, since the trained model no longer shows them."""
        return {f"{a}.{key}": t for a, (sB0, A0) in self.initial.items() for key, t in (("B", sB0), ("A", A0))}

    def restore_initial(self, state: dict[str, Tensor]) -> None:
        """Replace the initial factors by ``state`` (as from :meth:`initial_state`, or
        :func:`initial_factors_from_adapter`), e.g. those recorded before training by an earlier run."""
        initial = {}
        rows = self.shape()[0]
        for adapter in {key.rsplit(".", 1)[0] for key in state}:
            sB0, A0 = state[f"{adapter}.B"], state[f"{adapter}.A"]
            if sB0.dim() != 2 or A0.dim() != 2 or sB0.shape[0] != rows or sB0.shape[1] != A0.shape[0]:
                raise ValueError(
                    f"{self.name}: initial factors {tuple(sB0.shape)} x {tuple(A0.shape)} do not fit this layer"
                )
            initial[adapter] = (sB0.detach().double(), A0.detach().double())
        self.initial, self.initial_unknown = initial, None

    def _base_param(self) -> Tensor:
        """The parameter the reference is read from, as stored (not gathered)."""
        return self.module.get_param() if hasattr(self.module, "get_param") else self.module.get_base_layer().weight

    def _base_owner(self) -> nn.Module | None:
        """The layer owning :meth:`_base_param` (where bitsandbytes keeps a 4-bit state a wrapper dropped)."""
        return None if hasattr(self.module, "get_param") else self.module.get_base_layer()

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
        # the stored parameter says whether it is trainable: reading the weight would dequantize a quantized base
        # (a pass over it on the training thread) only to find it frozen
        copy_base = self._base_param().requires_grad or sharded
        return CapturedMatrix(
            self.name,
            self,
            [(own(B), own(A), s) for B, A, s in self.adapter_weights()]
            + [(sB0, A0, -1.0) for sB0, A0 in self.initial.values()],  # already private copies
            None if magnitude is None else own(magnitude),
            own(self.base_weight()) if copy_base else None,
        )


@dataclass
class CapturedMatrix:
    """The state of a :class:`MonitoredMatrix` at one step, with the same measuring interface."""

    name: str
    live: MonitoredMatrix
    weights: list[tuple[Tensor, Tensor, float]]  # copies of the update terms (B, A, scaling)
    magnitude: Tensor | None
    base: Tensor | None  # a copy of the reference when the live base weight was trainable, else None (read live)

    @property
    def module(self) -> nn.Module:
        return self.live.module

    def base_weight(self) -> Tensor:
        return self.live.base_weight() if self.base is None else self.base

    def shape(self) -> torch.Size:
        return self.live.shape()

    def update_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        return stack_factors(self.weights, dtype, device)

    # the same computations on the copied factors
    update_singular_values = MonitoredMatrix.update_singular_values
    update_effective_rank = MonitoredMatrix.update_effective_rank

    def capture(self) -> CapturedMatrix:
        """Already a frozen copy."""
        return self

    def operator(self, W0: Tensor) -> LowRankUpdatedMatrix:
        return merged_operator(W0, self.update_factors(W0.dtype, W0.device), self.magnitude)


def unmerged_active_adapters(module: Any) -> list[str]:
    """The adapters whose update the merged weight adds to the base: active, present here, not merged into it."""
    merged = set(getattr(module, "merged_adapters", ()))
    return [a for a in module.active_adapters if a in adapter_names(module) and a not in merged]


def adapter_names(module: Any) -> set[str]:
    """Every adapter a PEFT tuner layer holds weights for (the keys of its ``adapter_layer_names`` dicts)."""
    names: set[str] = set()
    for attribute in module.adapter_layer_names:
        names.update(getattr(module, attribute, None) or ())
    return names
