"""SpectralMonitor: snapshot the pretrained bases once, then measure the merged LoRA weights on demand.

Usable on its own in any training loop (plain PyTorch, accelerate); the Trainer callback is a thin scheduler
around it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .basis_store import BasisStore
from .layers import CapturedMatrix, MonitoredMatrix, describe_skipped, find_lora_matrices
from .linalg import exact_top_singular_triplets, top_singular_triplets
from .metrics import (
    basis_rounding_error,
    count_intruders,
    effective_rank,
    low_rank_singular_values,
    max_abs_cosine,
)
from .report import LayerReport, SpectralReport, _eps_key

logger = logging.getLogger(__name__)

__all__ = ["SpectralConfig", "SpectralMonitor"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SpectralConfig:
    """What to measure and how; validated on construction so a bad option fails before training starts.

    ``epsilon`` may be one threshold or several (the first is primary: totals, alerts); all come from one
    decomposition. ``basis_dtype`` is how the pretrained bases are stored: float16 halves memory and moves a
    cosine by at most 4.9e-4, which the solver accounts for when deciding a count. ``basis_device`` is a torch
    device, or ``"disk"`` to keep the bases memory-mapped from safetensors files (in ``basis_cache_dir``, else a
    temporary directory); ``basis_cache_dir`` reuses bases computed by earlier runs on the same base weights
    (see :mod:`.basis_store`). Solver defaults (``oversample=20``, ``tol=0.05``, ``exact_below=128``) were chosen
    by ``benchmarks/bench_detection.py`` (docs/sections/performance.md): ``tol`` only bounds the error of the
    reported vectors/cosines; every count is decided by the error bound against its threshold margin regardless.
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
    epsilons: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        eps = (self.epsilon,) if isinstance(self.epsilon, (int, float)) else tuple(self.epsilon)
        object.__setattr__(self, "epsilons", tuple(float(e) for e in eps))
        _require(isinstance(self.top_k, int) and self.top_k > 0, "top_k", self.top_k, "an integer >= 1")
        _require(
            len(self.epsilons) > 0 and all(0 < e < 1 for e in self.epsilons),
            "epsilon", self.epsilon, "a number or list of numbers strictly between 0 and 1",
        )
        for name in ("compute_dtype", "basis_dtype"):
            allowed = ("float32", "float64") if name == "compute_dtype" else tuple(_DTYPES)
            _require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {allowed}")
        _require(self.basis_device == "disk" or _is_device(self.basis_device), "basis_device", self.basis_device,
                 '"disk" or a torch device such as "cpu" or "cuda"')
        _require(self.exact_below >= 0, "exact_below", self.exact_below, "an integer >= 0")
        _require(self.oversample >= 0, "oversample", self.oversample, "an integer >= 0")
        _require(0 < self.tol < 1, "tol", self.tol, "a number strictly between 0 and 1")
        _require(self.max_iter >= 1, "max_iter", self.max_iter, "an integer >= 1")
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


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


class SpectralMonitor:
    """Measures intruder dimensions, effective rank and top singular values of every LoRA-merged weight.

    ``snapshot()`` computes the thin left singular basis of each pretrained weight (one full SVD per matrix, the
    slow part, done once); ``measure(step)`` then costs a few products with each weight per matrix.
    """

    def __init__(self, model: nn.Module, **options) -> None:
        self.config = SpectralConfig(**options)
        self.model = model
        self.matrices, skipped = find_lora_matrices(model, self.config.include, self.config.exclude)
        if skipped:
            logger.warning("lora-spectral-callback cannot measure these LoRA layers yet: %s", describe_skipped(skipped))
        if not self.matrices:
            raise ValueError(
                "No LoRA layer to monitor"
                + (f" matches include={self.config.include!r} exclude={self.config.exclude!r}" if self.config.include or self.config.exclude else "")
                + ": wrap the model with peft.get_peft_model(...) and a LoraConfig first."
            )
        self._basis: dict[str, Tensor] = {}
        self._store = BasisStore(_DTYPES[self.config.basis_dtype], self.config.basis_device, self.config.basis_cache_dir)
        self._warm_start: dict[str, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._reported: set[tuple[str, str]] = set()

    # -- snapshot -------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.config.compute_dtype]

    def snapshot(self) -> None:
        """Store the thin left singular basis of every monitored pretrained weight (idempotent)."""
        todo = [m for m in self.matrices if m.name not in self._basis]
        if not todo:
            return
        from tqdm.auto import tqdm

        for matrix in tqdm(todo, desc="spectral snapshot", disable=not self.config.progress, leave=False):
            with torch.no_grad():
                W0 = matrix.base_weight().detach().to(self.compute_dtype)
                if not torch.isfinite(W0).all():
                    raise ValueError(f"pretrained weight of {matrix.name} contains NaN or Inf")
                self._basis[matrix.name] = self._store.basis(W0)

    def basis_bytes(self) -> int:
        """Memory held for the pretrained bases (0 when memory-mapped from disk: only droppable page cache)."""
        if self._store.on_disk:
            return 0
        return sum(b.numel() * b.element_size() for b in self._basis.values())

    # -- measurement ----------------------------------------------------------------------------------------
    def capture(self) -> list[CapturedMatrix]:
        """The current LoRA state of every monitored matrix, copied, to ``measure`` later (see ``background``)."""
        return [matrix.capture() for matrix in self.matrices]

    def measure(self, step: int | None = None, matrices: Sequence[MonitoredMatrix | CapturedMatrix] | None = None) -> SpectralReport:
        """Measure every monitored matrix (or the ``capture()``-d copies given); a layer that fails is recorded in
        ``errors`` and skipped."""
        self.snapshot()
        start = time.perf_counter()
        layers: dict[str, LayerReport] = {}
        errors: dict[str, str] = {}
        nonfinite: list[str] = []
        for matrix in self.matrices if matrices is None else matrices:
            try:
                layers[matrix.name] = self.measure_matrix(matrix)
            except _NonFinite as err:
                nonfinite.append(matrix.name)
                errors[matrix.name] = str(err)
                self._log_once(matrix.name, "nonfinite", f"{matrix.name}: {err}")
            except Exception as err:  # monitoring must never take the training run down
                if self.config.strict:
                    raise
                errors[matrix.name] = f"{type(err).__name__}: {err}"
                self._log_once(matrix.name, type(err).__name__, f"skipping {matrix.name} in this measurement: {errors[matrix.name]}")
        return SpectralReport.from_layers(
            step, list(self.config.epsilons), layers, errors, nonfinite, time.perf_counter() - start
        )

    @torch.no_grad()
    def measure_matrix(self, matrix: MonitoredMatrix | CapturedMatrix) -> LayerReport:
        """Top-k singular triplets of one merged weight, their max |cos| with the pretrained basis, and ranks."""
        cfg = self.config
        t0 = time.perf_counter()
        basis = self._basis[matrix.name]
        W0 = matrix.base_weight().detach()
        if W0.shape[0] != basis.shape[0]:
            raise ValueError(f"weight shape {tuple(W0.shape)} no longer matches the snapshot ({basis.shape[0]} rows)")
        W0 = W0.to(self.compute_dtype)
        op = matrix.operator(W0)
        if op.B is not None and not (torch.isfinite(op.B).all() and torch.isfinite(op.A).all()):
            raise _NonFinite("LoRA factors contain NaN or Inf")
        if op.row_scale is not None and not torch.isfinite(op.row_scale).all():
            raise _NonFinite("DoRA row scale contains NaN or Inf")

        slack = basis_rounding_error(basis.dtype)
        epsilons = torch.tensor(cfg.epsilons, dtype=W0.dtype, device=W0.device)

        def distance(max_cos: Tensor) -> Tensor:  # how far each cosine may move before a count flips
            return (max_cos[None, :] - epsilons[:, None]).abs().amin(dim=0) - slack

        def margin(U: Tensor) -> Tensor:
            return distance(max_abs_cosine(U, basis))

        if min(op.shape) <= cfg.exact_below:
            svd = exact_top_singular_triplets(op, cfg.top_k)
        else:
            start = self._warm_start.get(matrix.name)
            if start is None or start.shape[0] != op.shape[0]:
                start = basis[:, : cfg.top_k + cfg.oversample].to(W0.device, W0.dtype)
            svd = top_singular_triplets(
                op, cfg.top_k, start, oversample=cfg.oversample, tol=cfg.tol, max_iter=cfg.max_iter,
                needed_accuracy=margin, generator=self._generator(W0.device),
            )
            self._warm_start[matrix.name] = svd.block
        max_cos = max_abs_cosine(svd.U, basis)
        if not torch.isfinite(svd.S).all():
            raise _NonFinite("merged weight has non-finite singular values")
        uncertain = int((distance(max_cos) < svd.error).sum())
        counts = count_intruders(max_cos, cfg.epsilons)
        factors = matrix.update_factors(torch.float64, W0.device)
        rank = effective_rank(low_rank_singular_values(*factors)) if factors else 0.0
        return LayerReport(
            intruders=counts[cfg.epsilons[0]],
            intruders_by_epsilon={_eps_key(e): n for e, n in counts.items()},
            max_cos=max_cos.tolist(),
            singular_values=svd.S.tolist(),
            effective_rank=rank,
            converged=svd.converged,
            iterations=svd.iterations,
            uncertain=uncertain,
            seconds=time.perf_counter() - t0,
        )

    def _generator(self, device: torch.device) -> torch.Generator:
        """A private seeded generator per device: random fill never advances the global RNG."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[device]

    def _log_once(self, name: str, kind: str, message: str) -> None:
        if (name, kind) not in self._reported:
            self._reported.add((name, kind))
            logger.warning("lora-spectral-callback: %s", message)


class _NonFinite(ValueError):
    """NaN/Inf in the weights: a real training failure, reported as such rather than as a monitoring error."""

