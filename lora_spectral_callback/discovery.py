"""Which matrices of a model are monitored: PEFT adapter layers (LoRA and other tuners), or the plain layers of a
fully fine-tuned model, filtered by the ``include``/``exclude`` regexes.

:func:`find_matrices` is the one entry point: it picks the mode (``"auto"``: LoRA iff PEFT put adapter layers into
the model), warns about adapter layers it cannot measure instead of dropping them silently, and fails with a message
that lists the candidate layers when the filters select none.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from .config import DTYPES, SpectralConfig
from .full_finetune import DenseMatrix, Keep
from .inits import base_rewriting_inits, configs_for, peft_configs, record_initial
from .layers import MonitoredMatrix, adapter_names, readable_name
from .layout import is_matrix_layer
from .matrix import WeightMatrix
from .quantized import is_quantized, weight_shape
from .sharding import logical_shape, unsupported_sharding
from .tuners import tuner_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "dense_layers",
    "describe_skipped",
    "find_dense_matrices",
    "find_lora_matrices",
    "find_matrices",
    "has_peft_layers",
    "selected",
]


def find_matrices(
    model: nn.Module, config: SpectralConfig, keep: Keep | None = None, copy_device: str = "cpu"
) -> tuple[str, list[WeightMatrix]]:
    """The monitoring mode (``"lora"`` or ``"full"``) and the monitored matrices of ``model``, in model order.

    Full mode copies each selected pretrained weight now, on ``copy_device`` in ``config.weight_copy_dtype``, and
    hands each copy to ``keep`` (where it is kept: on disk, or only its shape on a rank that never measures).

    Raises:
        ValueError: FSDP1, a filter that selects nothing, or a model without monitorable layers.
    """
    unreadable = unsupported_sharding(model)
    if unreadable:
        raise ValueError(f"lora-spectral-callback cannot monitor this model: {unreadable}")
    mode = monitoring_mode(model, config)
    matrices: list[WeightMatrix]
    if mode == "full":
        dense = find_dense_matrices(
            model,
            config.include,
            config.exclude,
            DTYPES[config.weight_copy_dtype],
            copy_device,
            keep,
            config.effective_rank_method,
        )
        matrices = list(dense)
        log = logger.warning if config.mode == "auto" else logger.info  # say so loudly if it was not asked for
        log(
            "lora-spectral-callback: %sfull fine-tuning mode: %d matrices, %.1f MB of pretrained weight copies%s",
            "no LoRA layer found, " if config.mode == "auto" else "",
            len(matrices),
            sum(m.copy_bytes() for m in dense) / 1e6,
            ", memory-mapped from disk" if config.basis_device == "disk" else "",
        )
    else:
        lora, skipped = find_lora_matrices(model, config.include, config.exclude)
        matrices = list(lora)
        if skipped:
            logger.warning(
                "lora-spectral-callback cannot measure these adapter layers yet: %s", describe_skipped(skipped)
            )
    if not matrices:
        raise ValueError(_nothing_to_monitor(model, mode, config.include, config.exclude))
    return mode, matrices


def monitoring_mode(model: nn.Module, config: SpectralConfig) -> str:
    """``config.mode``, with ``"auto"`` decided: LoRA if the model has PEFT layers; a full fine-tune only when layers
    were named (copying every weight of a model nobody asked about would be a nasty surprise)."""
    if config.mode != "auto":
        return config.mode
    return "lora" if has_peft_layers(model) or config.include is None else "full"


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

    configs = peft_configs(model)
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
            inits = base_rewriting_inits(module, configs_for(path, configs))
            merged = [a for a in inits if a in module.merged_adapters]
            if reason is None and merged:
                reason = f"adapter {merged[0]!r} (init_lora_weights={inits[merged[0]]!r}) merged into a rewritten base"
            if reason is None:
                matrix = MonitoredMatrix(name, module)
                record_initial(matrix, inits)
        else:
            matrix, reason = tuner_matrix(name, module)
        if matrix is not None:
            found.append(matrix)
        else:
            skipped[name] = reason or f"layer type {type(module).__name__}"
    return found, skipped


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
    if not is_conv and len(weight_shape(weight, base)) != 2:
        return f"base weight of shape {tuple(weight_shape(weight, base))}"
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


def _is_dense_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return is_matrix_layer(module) and isinstance(weight, torch.Tensor) and not is_quantized(weight, module)


def dense_layers(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> list[tuple[str, nn.Module]]:
    """``(module path, module)`` of every plain layer full mode can monitor, filtered by the regexes; reads no
    weight (so it never gathers a shard)."""
    return [(name, m) for name, m in model.named_modules() if _is_dense_layer(m) and selected(name, include, exclude)]


def find_dense_matrices(
    model: nn.Module,
    include: str | None,
    exclude: str | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep: Keep | None = None,
    rank_method: str = "exact",
) -> list[DenseMatrix]:
    """Every ``Linear``/``Conv1D``/``Embedding``/conv layer whose module path matches ``include`` and not
    ``exclude``, with a copy of its current (pretrained) weight taken now (and handed to ``keep`` one at a time,
    so spilling to disk never holds more than one extra copy in memory)."""
    return [
        DenseMatrix.snapshot_of(name, module, dtype, device, keep, rank_method)
        for name, module in dense_layers(model, include, exclude)
    ]


def _nothing_to_monitor(model: nn.Module, mode: str, include: str | None, exclude: str | None) -> str:
    """Why no layer was selected: filters that match none of the candidate layers (listed), or nothing to watch."""
    if include or exclude:
        if mode == "full":
            available = [name for name, _ in dense_layers(model)]
        else:
            available = [m.name for m in find_lora_matrices(model)[0]]
        if available:
            shown = ", ".join(available[:6]) + (f", ... ({len(available)} in all)" if len(available) > 6 else "")
            kind = "PEFT adapter layers" if mode == "lora" else "Linear/Conv1D/Embedding/conv layers"
            return (
                f"include={include!r} exclude={exclude!r} match none of the model's {kind}: "
                f"must select at least one of: {shown}"
            )
    if mode == "full":
        return "No Linear/Conv1D/Embedding/conv layer to monitor in this model."
    return (
        "No PEFT adapter layer to monitor: wrap the model with peft.get_peft_model(...) and a LoraConfig (or "
        "another tuner's config) first, "
        "or monitor a full fine-tune by naming its layers: include=<regex>, mode='full'."
    )
