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

The reference a merged weight is compared with is the true pretrained weight ``W0`` (Shuttleworth et al. 2024
compare with the pretrained model). Usually that is the frozen base weight. Inits that rewrite the base
(``init_lora_weights`` = ``"pissa"``/``"pissa_niter_*"``, ``"olora"``, ``"corda"``, ``"loftq"``, ``"lora_ga"``:
PEFT's ``pissa_init``/``olora_init``/... store ``W_res = W0 - s B0 A0`` as the base) are read from the PEFT config,
and the initial factors ``(s B0, A0)`` of such an adapter are copied when the layer is found, so that
``W0 = W_res + s B0 A0`` and ``merged - W0 = [s B, -s B0] [A; A0]``: still low-rank (rank <= 2r) and exact. (For
LoftQ, ``W_res`` is the quantized weight and ``W_res + s B0 A0`` is LoftQ's approximation of ``W0``, which is what
the model computes before training; the true ``W0`` is not kept by PEFT.) The copy is only right if the adapter has
not been trained yet: see :meth:`MonitoredMatrix.restore_initial` and :func:`initial_factors_from_adapter` for a
monitor created later, and :func:`_moved_since_init` for the check that catches it for PiSSA and OLoRA.

Other PEFT tuners are adapted in :mod:`.tuners`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

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
    "rewrites_base",
    "initial_factors_from_adapter",
]

_PEFT_PREFIXES = ("base_model.model.", "base_model.")

# init_lora_weights values whose PEFT init replaces the base weight by W0 - s B0 A0 (LoraLayer.update_layer and
# ParamWrapper.update_layer; Embedding and conv layers never do: PEFT falls back to the default init or refuses).
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def readable_name(module_path: str) -> str:
    """Module path without PEFT's wrapper segments (``base_model.model.``), also where a PeftModel sits inside a
    larger module (``encoder.base_model.model.layer.0`` -> ``encoder.layer.0``)."""
    name = module_path.replace("." + _PEFT_PREFIXES[0], ".")
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def rewrites_base(init: object) -> bool:
    """Whether ``LoraConfig.init_lora_weights`` names an init that stores ``W0 - s B0 A0`` as the base weight."""
    return isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)


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
        from peft.utils.integrations import dequantize_module_weight

        if hasattr(self.module, "get_param"):  # target_parameters (ParamWrapper): a 2-D parameter, used as stored
            return full(self.module.get_param())
        base = self.module.get_base_layer()
        W = full(base.weight) if base.weight.is_floating_point() else dequantize_module_weight(base)
        if self.is_embedding or getattr(self.module, "fan_in_fan_out", False):
            return W.T
        return W.flatten(1)  # a no-op for Linear; ConvNd kernels -> (out_channels, in_channels * kernel volume)

    def base_weight(self) -> Tensor:
        """The reference: the pretrained weight in (out, in) layout (``W_res + sum s B0 A0`` after a base-rewriting
        init, computed in at least float32)."""
        return self._reference(self.stored_weight())

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
        shape = logical_shape(self._base_param())
        rows = shape[1] if self.is_embedding or getattr(self.module, "fan_in_fan_out", False) else shape[0]
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
        stored = self.stored_weight()
        return CapturedMatrix(
            self.name,
            self,
            [(own(B), own(A), s) for B, A, s in self.adapter_weights()]
            + [(sB0, A0, -1.0) for sB0, A0 in self.initial.values()],  # already private copies
            None if magnitude is None else own(magnitude),
            own(self._reference(stored)) if stored.requires_grad or sharded else None,
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
    """``(B, A)`` with ``B @ A = sum_a s_a B_a A_a``: terms stacked side by side, scaling folded into B."""
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


def _unsupported_reason(module: Any) -> str | None:
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
    active = [a for a in module.active_adapters if a in adapter_names(module)]
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


def _base_rewriting_inits(module: Any, configs: dict[str, Any]) -> dict[str, str]:
    """``{adapter: init}`` of this LoRA layer's adapters whose init rewrote its base weight."""
    from peft.tuners.lora import Embedding
    from peft.tuners.lora.layer import _ConvNd

    if isinstance(module, (Embedding, _ConvNd)):
        return {}
    inits = {a: getattr(configs.get(a), "init_lora_weights", None) for a in adapter_names(module)}
    return {a: str(init) for a, init in inits.items() if rewrites_base(init)}


@torch.no_grad()
def _record_initial(matrix: MonitoredMatrix, inits: dict[str, str]) -> None:
    """Copy ``(s B0, A0)`` of each base-rewriting adapter now, in float64 where they live: ``s B0`` is then
    bit-identical to the ``s B`` that :func:`stack_factors` forms in float64 while ``B`` is untouched, so the update
    ``[s B, -s B0] [A; A0]`` cancels exactly before training."""
    for adapter in inits:
        B, A = matrix.adapter_factors(adapter)
        matrix.initial[adapter] = (B.detach().double() * matrix.module.scaling[adapter], A.detach().double())
    matrix.initial_unknown = _moved_since_init(matrix, inits)


def _moved_since_init(matrix: MonitoredMatrix, inits: dict[str, str]) -> str | None:
    """Why the current factors cannot be the initial ones, when an invariant of the init proves it; else None.

    PiSSA (also ``pissa_niter_*``: ``svd_lowrank`` gives ``W_res = (I - Q Q^T) W0``) removes a top singular part,
    so ``B0^T W_res = 0``; OLoRA (``W0 = Q R``, ``B0 = Q_r``, ``A0 = R_r``) leaves ``B0^T W_res = (1 - s) A0``.
    Relative to ``||B|| (||W_res|| + ||s B A||)`` the residual at init is rounding: half a unit roundoff of the
    stored base plus PEFT's float32 arithmetic (measured <= 1.6e-7 on all-MiniLM-L6-v2; one Adam step of 1e-5 moves
    it past 6e-6). CorDA's factors use a numerically inverted covariance (PEFT accepts 5% inversion error), LoftQ
    and LoRA-GA have no such invariant: those are trusted, as are quantized or sharded bases.
    """
    stored = matrix.stored_weight() if not module_is_sharded(matrix.module) else None
    if stored is None or not matrix._base_param().is_floating_point():
        return None
    W = stored.detach().double()
    tol = 16 * torch.finfo(torch.float32).eps + torch.finfo(stored.dtype).eps / 2
    for adapter, init in inits.items():
        kind = init.lower()
        if not kind.startswith(("pissa", "olora")):
            continue
        B, A = (t.detach().double() for t in matrix.adapter_factors(adapter))
        s = matrix.module.scaling[adapter]
        expected = (1 - s) * A if kind == "olora" else torch.zeros_like(A)
        residual = torch.linalg.matrix_norm(B.T @ W - expected)
        scale = torch.linalg.matrix_norm(B) * (torch.linalg.matrix_norm(W) + s * torch.linalg.matrix_norm(B @ A))
        if residual > tol * scale:
            return (
                f"adapter {adapter!r} (init_lora_weights={init!r}) was trained before the monitor was created: "
                f"its init rewrote the base weight to W0 - s B0 A0 and the pretrained W0 cannot be rebuilt from the "
                "model any more. Create the monitor before training, restore the initial factors "
                "(MonitoredMatrix.restore_initial, initial_factors_from_adapter; CLI: --initial-adapter), or "
                "measure the adapter converted by save_pretrained(path_initial_model_for_weight_conversion=...) "
                "on the original base"
            )
    return None


def _peft_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {adapter: config}}`` of every module holding PEFT configs (PeftModel, its tuner model, a
    transformers model with PEFT integration)."""
    return {
        path: configs
        for path, module in model.named_modules()
        if isinstance(configs := getattr(module, "peft_config", None), dict)
    }


def _configs_for(path: str, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The configs of the innermost module above ``path`` that holds any."""
    owners = [p for p in configs if p == "" or path.startswith(p + ".")]
    return configs[max(owners, key=len)] if owners else {}


def selected(name: str, include: str | None, exclude: str | None) -> bool:
    """Whether a layer name passes the ``include`` / ``exclude`` regexes (both modes filter with this)."""
    return not (include and not re.search(include, name)) and not (exclude and re.search(exclude, name))


def has_peft_layers(model: nn.Module) -> bool:
    """Whether PEFT has put any adapter layer (LoRA or another tuner) into ``model``; decides ``mode="auto"``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def find_lora_matrices(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> tuple[list[Any], dict[str, str]]:
    """All PEFT adapter layers of ``model`` (LoRA and the other tuners of :mod:`.tuners`) whose readable name
    matches ``include`` and not ``exclude`` (regexes).

    Returns the monitorable matrices and ``{name: reason}`` for adapter layers this version cannot measure, so
    the caller can warn about them rather than drop them silently. The PEFT configs are looked up in ``model``
    (a PeftModel or a model with PEFT's transformers integration) to find base-rewriting inits.
    """
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .tuners import tuner_matrix  # builds on this module

    configs = _peft_configs(model)
    layers: list[tuple[str, Any]] = [(p, m) for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    wrapped = {id(m.base_layer) for _, m in layers if isinstance(getattr(m, "base_layer", None), BaseTunerLayer)}
    found: list[Any] = []
    skipped: dict[str, str] = {}
    for path, module in layers:
        name = readable_name(path)
        if not selected(name, include, exclude):
            continue
        matrix: Any = None
        if id(module) in wrapped or isinstance(getattr(module, "base_layer", None), BaseTunerLayer):
            reason: str | None = "tuner layers nested in one another (mixed adapter types)"
        elif isinstance(module, LoraLayer) and not isinstance(module, AdaLoraLayer):
            reason = _unsupported_reason(module)
            inits = _base_rewriting_inits(module, _configs_for(path, configs))
            merged = [a for a in inits if a in module.merged_adapters]
            if reason is None and merged:
                reason = f"adapter {merged[0]!r} (init_lora_weights={inits[merged[0]]!r}) merged into a rewritten base"
            if reason is None:
                matrix = MonitoredMatrix(name, module)
                _record_initial(matrix, inits)
        else:
            matrix, reason = tuner_matrix(name, module)
        if matrix is not None:
            found.append(matrix)
        else:
            skipped[name] = reason or f"layer type {type(module).__name__}"
    return found, skipped


@torch.no_grad()
def initial_factors_from_adapter(model: Any, path: str, adapter: str = "default") -> dict[str, dict[str, Tensor]]:
    """``{layer name: state for MonitoredMatrix.restore_initial}`` from a saved *initial* adapter, as PEFT's PiSSA,
    OLoRA and CorDA recipes save one before training (``pissa_init/`` next to the residual base model): the
    reference of ``adapter`` becomes ``W_res + s B0 A0`` with that adapter's ``B0, A0`` and scaling.

    The initial adapter is loaded into ``model`` (a PeftModel) under a temporary name with the default init (so its
    base-rewriting init is not run a second time), read, and deleted.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(path)
    config.init_lora_weights = True
    temporary = "lora_spectral_initial"
    model.add_adapter(temporary, config)
    try:
        model.load_adapter(path, adapter_name=temporary)
        states = {}
        for module_path, module in model.named_modules():
            if temporary in getattr(module, "lora_A", {}):
                matrix = MonitoredMatrix(readable_name(module_path), module)
                B, A = matrix.adapter_factors(temporary)
                s = module.scaling[temporary]
                states[matrix.name] = {f"{adapter}.B": B.detach().double() * s, f"{adapter}.A": A.detach().double()}
    finally:
        model.delete_adapter(temporary)
    return states


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
