"""The paper's mitigation: scale intruder directions of the merged weights down, after training.

Shuttleworth et al. 2024 (arXiv 2410.21228), Sec. 5: for a merged weight ``W = W0 + s B A`` with SVD
``sum_j sigma_j u_j v_j^T``, replacing an intruder's ``sigma_i`` by ``lambda * sigma_i``,

    W_new = W + (lambda - 1) * sigma_i * u_i v_i^T,

reduces forgetting of the pretraining distribution at a small cost in task accuracy. Because ``u_i, v_i`` are
singular vectors of ``W``, ``W_new`` keeps every singular vector of ``W`` and only that one singular value changes.

Detection is :func:`.measure.decompose` (same triplets, same ``max|cos| < epsilon`` rule as the live
metrics). The result is written to a *new* PEFT adapter, like PEFT's ``reduce_intruder_dimension``:

- ``mode="exact"`` (default): the update ``W_new - W0 = s B A + (lambda - 1) sum_i sigma_i u_i v_i^T`` has rank
  ``r + n`` (n directions scaled in that layer) and is stored as exactly that: ``B' = [B, (lambda-1) sigma U / s]``,
  ``A' = [A; V^T]``, with a per-layer ``rank_pattern``/``alpha_pattern`` so the scaling stays ``s``. ``W_new`` is
  reproduced up to the rounding of the adapter dtype.
- ``mode="refactor"``: the same update truncated back to rank ``r`` by a float64 SVD (what PEFT does, so the
  adapter keeps the original shapes); the truncation is not exact and its relative Frobenius error is reported.

For merged weights, call ``model.merge_and_unload()`` afterwards.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .basis_store import BasisStore
from .config import DTYPES, SpectralConfig
from .discovery import find_matrices
from .layers import MonitoredMatrix
from .measure import Decomposition, decompose
from .monitor import SpectralMonitor
from .sharding import module_is_sharded

__all__ = ["ScaledDirection", "MitigationResult", "scale_intruders"]

# Triplets for mitigation are computed in float64 and tightly: the scaled component must be the real one.
_MITIGATION_OPTIONS = {"compute_dtype": "float64", "basis_dtype": "float32", "tol": 1e-8, "progress": False}


@dataclass
class ScaledDirection:
    """One scaled intruder: its rank among the top-k, singular value before scaling, and max |cos|."""

    index: int
    sigma: float
    max_cos: float


@dataclass
class MitigationResult:
    """What :func:`scale_intruders` did: the new adapter's name and, per layer, the directions it scaled."""

    adapter_name: str
    mode: str
    lam: float
    scaled: dict[str, list[ScaledDirection]] = field(default_factory=dict)
    truncation_error: dict[str, float] = field(default_factory=dict)  # refactor mode: ||dropped||_F / ||dW_new||_F

    @property
    def directions_scaled(self) -> int:
        return sum(len(v) for v in self.scaled.values())


def scale_intruders(
    model: Any,
    lam: float = 0.75,
    epsilon: float = 0.5,
    top_k: int = 10,
    which: Literal["top", "all"] = "top",
    mode: Literal["exact", "refactor"] = "exact",
    new_adapter_name: str = "intruders_scaled",
    monitor: SpectralMonitor | None = None,
    **monitor_options: Any,
) -> MitigationResult:
    """Scale intruder directions of every monitored LoRA matrix by ``lam`` into a new, activated adapter.

    ``which="top"`` scales the largest intruder of each matrix (the paper's intervention); ``"all"`` scales every
    intruder among the top-k (PEFT's ``reduce_intruder_dimension``). ``model`` is a ``PeftModel`` with one active
    LoRA adapter (not DoRA); switch back with ``model.set_adapter(<old name>)``. ``monitor`` may be an existing
    :class:`SpectralMonitor` on this model (its bases are reused, and its own ``compute_dtype``/``tol`` then decide
    how exact the triplets are); by default the triplets are computed in float64 against a basis computed here, with
    ``monitor_options`` (``include``, ...).

    Args:
        model: A ``PeftModel`` with exactly one active LoRA adapter.
        lam: Factor for the chosen singular values, in [0, 1].
        epsilon: Intruder threshold.
        top_k: Top singular vectors examined per matrix.
        which: ``"top"``: the largest intruder of each matrix; ``"all"``: every intruder among the top-k.
        mode: ``"exact"``: the new adapter has rank r + n per layer and reproduces ``W_new`` up to the adapter
            dtype's rounding; ``"refactor"``: truncated back to rank r by an SVD, as PEFT does (not exact; the
            dropped relative Frobenius norm is in ``truncation_error``).
        new_adapter_name: Name of the new, activated adapter; the original one is kept.
        monitor: An existing :class:`SpectralMonitor` on this model whose bases are reused.
        **monitor_options: :class:`SpectralConfig` fields used when no ``monitor`` is given.

    Returns:
        What was scaled, per layer.
    """
    if not 0 <= lam <= 1:
        raise ValueError(f"lam={lam!r} is invalid: must be a number in [0, 1]")
    if which not in ("top", "all"):
        raise ValueError(f"which={which!r} is invalid: must be 'top' or 'all'")
    if mode not in ("exact", "refactor"):
        raise ValueError(f"mode={mode!r} is invalid: must be 'exact' or 'refactor'")
    active = list(getattr(model, "active_adapters", []))
    if len(active) != 1 or not hasattr(model, "add_adapter"):
        raise ValueError(f"scale_intruders needs a PeftModel with exactly one active LoRA adapter, found {active}")
    (adapter,) = active
    if new_adapter_name in model.peft_config:
        raise ValueError(f"new_adapter_name={new_adapter_name!r} is invalid: the model already has that adapter")
    if monitor is None:
        config = SpectralConfig(top_k=top_k, epsilon=epsilon, **{**_MITIGATION_OPTIONS, **monitor_options})
        found = find_matrices(model, config)[1]
    else:
        found = monitor.matrices
    if any(module_is_sharded(m.module) for m in found):
        raise ValueError(
            "scale_intruders works on an unsharded model: gather it first (FSDP2 / ZeRO-3 shards are "
            "not supported here), e.g. on the saved adapter after training"
        )
    matrices = [m for m in found if type(m) is MonitoredMatrix]
    if len(matrices) != len(found):
        raise ValueError("scale_intruders writes a LoRA adapter: it supports LoRA layers only (not AdaLoRA, VeRA, ...)")
    if any(m.is_dora() for m in matrices):
        raise ValueError("scale_intruders does not support DoRA: its row rescaling is not a low-rank update")
    if monitor is not None:
        monitor.snapshot()
        detect: Callable[[MonitoredMatrix], Decomposition] = monitor.decompose
    else:
        detect = partial(_decompose_alone, config=config)

    result = MitigationResult(new_adapter_name, mode, lam)
    new_factors: dict[str, tuple[Tensor, Tensor]] = {}
    for matrix in matrices:
        found_here = detect(matrix)
        svd, max_cos = found_here.svd, found_here.max_cos
        intruders = torch.nonzero(max_cos[:top_k] < epsilon).flatten().tolist()
        chosen = intruders[:1] if which == "top" else intruders
        result.scaled[matrix.name] = [ScaledDirection(i, float(svd.S[i]), float(max_cos[i])) for i in chosen]
        B, A = _scaled_update(matrix, adapter, svd.U[:, chosen], svd.S[chosen], svd.V[:, chosen], lam)
        if mode == "refactor" and B.shape[1] > matrix.module.r[adapter]:
            B, A, result.truncation_error[matrix.name] = _truncate(B, A, matrix.module.r[adapter])
        new_factors[matrix.name] = (B, A)

    model.add_adapter(new_adapter_name, _adapter_config(model.peft_config[adapter], matrices, adapter, new_factors))
    with torch.no_grad():
        _copy_unmonitored(model, adapter, new_adapter_name, {m.module for m in matrices})
        for matrix in matrices:
            B, A = new_factors[matrix.name]
            old_B, old_A = matrix.module.lora_B[adapter].weight, matrix.module.lora_A[adapter].weight
            matrix.module.lora_B[new_adapter_name].weight.data = B.to(old_B.device, old_B.dtype)
            matrix.module.lora_A[new_adapter_name].weight.data = A.to(old_A.device, old_A.dtype)
    model.set_adapter(new_adapter_name)
    return result


def _decompose_alone(matrix: MonitoredMatrix, config: SpectralConfig) -> Decomposition:
    """:func:`.measure.decompose` against a basis of the pretrained weight computed just for this call."""
    W0 = matrix.base_weight().detach().to(DTYPES[config.compute_dtype])
    basis, _ = BasisStore(DTYPES[config.basis_dtype], config.basis_device, config.basis_cache_dir).basis(W0)
    return decompose(matrix, basis, config)


def _scaled_update(
    matrix: MonitoredMatrix, adapter: str, U: Tensor, S: Tensor, V: Tensor, lam: float
) -> tuple[Tensor, Tensor]:
    """Unscaled factors ``(B', A')`` with ``s B' A' = s B A + (lam - 1) U diag(S) V^T`` (exact, rank r + n).

    PEFT multiplies ``B A`` by the adapter's scaling ``s`` at run time, so the new columns are divided by it.
    """
    module = matrix.module
    dtype = U.dtype
    B = module.lora_B[adapter].weight.detach().to(U.device, dtype)
    A = module.lora_A[adapter].weight.detach().to(U.device, dtype)
    s = module.scaling[adapter]
    return torch.cat([B, U * ((lam - 1) * S / s)], dim=1), torch.cat([A, V.T], dim=0)


def _truncate(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``B A`` (Eckart-Young) in float64, split ``sqrt(S)`` to each side as PEFT does.

    ``B A = Q_B (R_B R_A^T) Q_A^T`` (QR of B and A^T), so only an (r+n) x (r+n) SVD is needed. Returns the factors
    and the relative Frobenius norm of what was dropped.
    """
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().T)
    Uc, S, Vch = torch.linalg.svd(R_B @ R_A.T)
    root = S[:rank].sqrt()
    error = float(S[rank:].norm() / S.norm()) if S.norm() > 0 else 0.0
    return (Q_B @ Uc[:, :rank]) * root, root[:, None] * (Vch[:rank] @ Q_A.T), error


def _copy_unmonitored(model: nn.Module, adapter: str, new: str, monitored: set[nn.Module]) -> None:
    """LoRA layers outside the monitor (``include``/``exclude``, other layer types) keep their update unchanged;
    ``add_adapter`` would otherwise leave them freshly initialised in the new adapter."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer) or module in monitored:
            continue
        for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            params = getattr(module, name, {})
            if adapter in params and new in params:
                target = params[new].weight if isinstance(params[new], nn.Module) else params[new]
                source = params[adapter].weight if isinstance(params[adapter], nn.Module) else params[adapter]
                target.data = source.detach().clone()


def _adapter_config(
    config: Any, matrices: list[MonitoredMatrix], adapter: str, factors: dict[str, tuple[Tensor, Tensor]]
):
    """The old adapter's config with a per-layer rank (r + n) and an alpha that keeps each layer's scaling.

    PEFT's scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); solving for alpha at the new rank keeps
    ``s``. Exact layer names go first: PEFT uses the first pattern that matches. The init is the default one: the
    factors are overwritten, and a base-rewriting init (PiSSA, OLoRA, ...) would rewrite the base a second time.
    """
    ranks, alphas = {}, {}
    for matrix in matrices:
        rank = factors[matrix.name][0].shape[1]
        if rank != matrix.module.r[adapter]:
            key = re.escape(matrix.name)
            ranks[key] = rank
            alphas[key] = matrix.module.scaling[adapter] * (rank**0.5 if config.use_rslora else rank)
    return dataclasses.replace(
        config,
        rank_pattern={**ranks, **(config.rank_pattern or {})},
        alpha_pattern={**alphas, **(config.alpha_pattern or {})},
        init_lora_weights=True,
    )
