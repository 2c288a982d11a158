"""What to measure and how (:class:`SpectralConfig`), and the one set of option checks every entry point uses.

Options are checked here, once, when a configuration is built, so that a bad value fails before training starts
with a message naming the option and what it accepts; the monitor, the callback and the alert rule share these
checks instead of repeating them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import torch

__all__ = ["DTYPES", "SpectralConfig", "is_int", "require", "require_int"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SpectralConfig:
    """What to measure and how; validated on construction so a bad option fails before training starts.

    ``epsilon`` may be one threshold or several (the first is primary: totals, alerts); all come from one
    decomposition. ``basis_dtype`` is how the pretrained bases are stored: float16 halves memory and moves a
    cosine by at most 4.9e-4, which the solver accounts for when deciding a count.

    ``mode``: ``"lora"`` monitors PEFT adapter layers (LoRA and the tuners of :mod:`.tuners`); ``"full"`` monitors
    plain Linear/Conv1D/Embedding/conv layers of a fully fine-tuned model against a copy of their pretrained weights
    taken at construction, stored in ``weight_copy_dtype`` on ``basis_device`` (see :mod:`.full_finetune`);
    ``"auto"`` picks ``"lora"`` iff PEFT has put adapter layers into the model. ``effective_rank_method`` (full mode
    only; LoRA's is always exact and cheap): ``"exact"`` takes all singular values of the dense update (float64
    ``svdvals``), ``"estimate"`` the deflated stochastic Lanczos estimate of
    :func:`.metrics.estimate_effective_rank` (faster on large matrices, error measured in docs/full-finetuning.md).
    ``basis_device`` is a torch device, or ``"disk"`` to keep the bases memory-mapped from safetensors files (in
    ``basis_cache_dir``, else a temporary directory; full mode's weight copies likewise, always in a private
    temporary directory); ``basis_cache_dir`` reuses bases computed by earlier runs on the same base weights (see
    :mod:`.basis_store`). ``tol`` only bounds the error of the reported vectors and cosines; every count is decided
    by the error bound against its threshold margin regardless.

    Args:
        top_k: Top singular vectors examined per matrix (the paper's k).
        epsilon: Intruder threshold, or a list of them strictly between 0 and 1; the first is primary.
        include: Regex on layer names (module path without PEFT's ``base_model.model.`` prefix): only matching
            layers are monitored.
        exclude: Regex on layer names: matching layers are not monitored.
        compute_dtype: Arithmetic of the solver, ``"float32"`` or ``"float64"``.
        basis_dtype: Storage of the pretrained bases; ``"float16"`` is the weight's own size in fp16 and moves a
            cosine by at most 4.9e-4 (accounted for in every decision).
        basis_device: Where the bases (and full mode's weight copies) live: a torch device, or ``"disk"`` for
            memory-mapped safetensors files (almost nothing resident).
        basis_cache_dir: Directory of bases keyed by a hash of the base weights: a sweep on one base model
            computes each basis once. Files are written atomically; concurrent runs may share it.
        exact_below: Matrices with ``min(m, n) <= exact_below`` use a float64 LAPACK SVD.
        oversample: Extra columns of the solver's start block beyond ``top_k`` (plus the columns of B).
        tol: Accuracy floor of the reported vectors and cosines; counts are decided by the error bound.
        max_iter: Iteration cap of the solver (a stall test stops earlier on an undecidable tie).
        seed: Seed of the solver's private generator; the global RNG is never touched.
        strict: Re-raise failures during a measurement instead of logging and skipping them.
        progress: Show a progress bar while snapshotting.
        mode: ``"lora"``, ``"full"`` or ``"auto"`` (see above).
        weight_copy_dtype: Full mode: dtype of the pretrained weight copies (float32: 4 bytes per parameter).
        effective_rank_method: Full mode: ``"exact"`` or ``"estimate"`` (see above).
        snapshot: How :meth:`SpectralMonitor.start` takes the snapshot: ``"background"`` (a worker thread;
            training goes on, and layers not reached yet are reported as ``pending``), ``"blocking"``, or
            ``"auto"``: the first matrix is snapshotted on the calling thread and timed, and the rest goes to the
            background when it would take longer than ``background_after`` seconds.
        background_after: Seconds of projected snapshot time above which ``"auto"`` goes to the background.
        split_across_ranks: In a multi-process LoRA run whose ranks each hold whole weights (DDP, ZeRO-1/2),
            every rank snapshots and measures its share of the matrices (balanced by snapshot cost) and the
            reports are combined on the main process; ``measure`` is then a collective (call it on every rank).
            The callback turns it on unless ``asynchronous``. A LoRA run with sharded weights (FSDP2, ZeRO-3) is
            always split (its ``measure`` is a collective anyway).

    Raises:
        ValueError: An invalid value, naming the option and what is allowed.
    """

    top_k: int = 10
    epsilon: float | Sequence[float] = 0.5
    include: str | None = None
    exclude: str | None = None
    compute_dtype: str = "float32"
    basis_dtype: str = "float16"
    basis_device: str = "cpu"
    basis_cache_dir: str | None = None
    exact_below: int = 128
    oversample: int = 20
    tol: float = 0.05
    max_iter: int = 100
    seed: int = 0
    strict: bool = False
    progress: bool = True
    snapshot: str = "auto"
    background_after: float = 2.0
    split_across_ranks: bool = False
    mode: str = "auto"
    weight_copy_dtype: str = "float32"
    effective_rank_method: str = "exact"
    epsilons: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        eps = (
            tuple(self.epsilon)
            if isinstance(self.epsilon, Iterable) and not isinstance(self.epsilon, str)
            else (self.epsilon,)
        )
        numbers = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in eps)
        object.__setattr__(self, "epsilons", tuple(float(e) for e in eps) if numbers else ())
        require_int("top_k", self.top_k, 1)
        require(
            len(self.epsilons) > 0 and all(0 < e < 1 for e in self.epsilons),
            "epsilon",
            self.epsilon,
            "a number or list of numbers strictly between 0 and 1",
        )
        for name in ("compute_dtype", "basis_dtype"):
            allowed = ("float32", "float64") if name == "compute_dtype" else tuple(DTYPES)
            require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {allowed}")
        require(self.mode in ("auto", "lora", "full"), "mode", self.mode, "one of ('auto', 'lora', 'full')")
        modes = ("auto", "background", "blocking")
        require(self.snapshot in modes, "snapshot", self.snapshot, f"one of {modes}")
        require(
            isinstance(self.background_after, (int, float)) and self.background_after >= 0,
            "background_after",
            self.background_after,
            "a number of seconds >= 0",
        )
        require(
            self.effective_rank_method in ("exact", "estimate"),
            "effective_rank_method",
            self.effective_rank_method,
            "one of ('exact', 'estimate')",
        )
        require(
            self.weight_copy_dtype in DTYPES, "weight_copy_dtype", self.weight_copy_dtype, f"one of {tuple(DTYPES)}"
        )
        require_int("exact_below", self.exact_below, 0)
        require_int("oversample", self.oversample, 0)
        require(
            isinstance(self.tol, (int, float)) and 0 < self.tol < 1,
            "tol",
            self.tol,
            "a number strictly between 0 and 1",
        )
        require_int("max_iter", self.max_iter, 1)
        require(
            self.basis_device == "disk" or _is_device(self.basis_device),
            "basis_device",
            self.basis_device,
            '"disk" or a torch device such as "cpu" or "cuda"',
        )
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except Exception as err:
                    raise ValueError(f"{name}={pattern!r} is not a valid regular expression: {err}") from None


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise the one kind of configuration error: ``ValueError("<name>=<value> is invalid: must be <allowed>")``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def require_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    """An integer (not a bool) ``>= minimum``; ``optional`` also accepts None."""
    if optional and value is None:
        return
    allowed = f"{'None or ' if optional else ''}an integer >= {minimum}"
    require(is_int(value) and value >= minimum, name, value, allowed)


def is_int(value: object) -> TypeGuard[int]:
    """An integer that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
