"""The true pretrained weight of layers whose LoRA init rewrote the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).

Such an init stores ``W_res = W0 - s B0 A0`` as the base weight (PEFT's ``pissa_init``/``olora_init``/...), so the
pretrained reference is ``W_res + s B0 A0``: the initial factors ``(s B0, A0)`` are recorded when a layer is found
(:func:`record_initial`), checked against the init's own invariant where it has one (PiSSA, OLoRA), and can be
restored from a saved initial adapter (:func:`initial_factors_from_adapter`) for a monitor created after training
started. The inits are read from the PEFT configs held in the model (:func:`peft_configs`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layers import MonitoredMatrix, adapter_names, readable_name
from .quantized import is_quantized
from .sharding import module_is_sharded

__all__ = [
    "base_rewriting_inits",
    "configs_for",
    "initial_factors_from_adapter",
    "peft_configs",
    "record_initial",
    "rewrites_base",
]


# init_lora_weights values whose PEFT init replaces the base weight by W0 - s B0 A0 (LoraLayer.update_layer and
# ParamWrapper.update_layer; Embedding and conv layers never do: PEFT falls back to the default init or refuses).
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def rewrites_base(init: object) -> bool:
    """Whether ``LoraConfig.init_lora_weights`` names an init that stores ``W0 - s B0 A0`` as the base weight."""
    return isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)


def base_rewriting_inits(module: Any, configs: dict[str, Any]) -> dict[str, str]:
    """``{adapter: init}`` of this LoRA layer's adapters whose init rewrote its base weight."""
    from peft.tuners.lora import Embedding
    from peft.tuners.lora.layer import _ConvNd

    if isinstance(module, (Embedding, _ConvNd)):
        return {}
    inits = {a: getattr(configs.get(a), "init_lora_weights", None) for a in adapter_names(module)}
    return {a: str(init) for a, init in inits.items() if rewrites_base(init)}


@torch.no_grad()
def record_initial(matrix: MonitoredMatrix, inits: dict[str, str]) -> None:
    """Copy ``(s B0, A0)`` of each base-rewriting adapter now, in float64 where they live: ``s B0`` is then
    bit-identical to the ``s B`` that :func:`.merged.stack_factors` forms in float64 while ``B`` is untouched, so the update
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
    if stored is None or is_quantized(matrix._base_param(), matrix._base_owner()):
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


def peft_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {adapter: config}}`` of every module holding PEFT configs (PeftModel, its tuner model, a
    transformers model with PEFT integration)."""
    return {
        path: configs
        for path, module in model.named_modules()
        if isinstance(configs := getattr(module, "peft_config", None), dict)
    }


def configs_for(path: str, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The configs of the innermost module above ``path`` that holds any."""
    owners = [p for p in configs if p == "" or path.startswith(p + ".")]
    return configs[max(owners, key=len)] if owners else {}


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
