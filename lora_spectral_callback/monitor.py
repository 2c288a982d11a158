"""SpectralMonitor: snapshot the pretrained bases once, then measure the merged LoRA weights on demand.

Usable on its own in any training loop (plain PyTorch, accelerate); the Trainer callback is a thin scheduler
around it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .basis_store import BasisStore
from .distributed import is_main_process
from .full_finetune import DenseMatrix, dense_layers, find_dense_matrices
from .layers import CapturedMatrix, MonitoredMatrix, describe_skipped, find_lora_matrices, has_peft_layers
from .linalg import KrylovSpace, TopSVD, exact_top_singular_triplets, top_singular_triplets
from .metrics import (
    all_finite,
    basis_rounding_error,
    count_intruders,
    effective_rank,
    estimate_effective_rank,
    max_abs_cosine,
)
from .report import LayerReport, LayerSpectra, SpectralReport, _eps_key
from .sharding import module_is_sharded, unsupported_sharding

logger = logging.getLogger(__name__)

__all__ = ["SpectralConfig", "SpectralMonitor"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SpectralConfig:
    """What to measure and how; validated on construction so a bad option fails before training starts.

    ``epsilon`` may be one threshold or several (the first is primary: totals, alerts); all come from one
    decomposition. ``basis_dtype`` is how the pretrained bases are stored: float16 halves memory and moves a
    cosine by at most 4.9e-4, which the solver accounts for when deciding a count.

    ``mode``: ``"lora"`` monitors PEFT LoRA layers; ``"full"`` monitors plain Linear/Conv1D/Embedding/conv layers
    of a fully fine-tuned model against a copy of their pretrained weights taken at construction, stored in
    ``weight_copy_dtype`` on ``basis_device`` (see :mod:`.full_finetune`); ``"auto"`` picks ``"lora"`` iff PEFT
    has put adapter layers into the model. ``effective_rank_method`` (full mode only; LoRA's is always exact and
    cheap): ``"exact"`` takes all singular values of the dense update (float64 ``svdvals``), ``"estimate"`` the
    deflated stochastic Lanczos estimate of :func:`.metrics.estimate_effective_rank` (faster on large matrices,
    error measured in the README).
    ``basis_device`` is a torch device, or ``"disk"`` to keep the bases memory-mapped from safetensors files (in
    ``basis_cache_dir``, else a temporary directory; full mode's weight copies likewise, always in a private
    temporary directory); ``basis_cache_dir`` reuses bases computed by earlier runs on the same base weights (see
    :mod:`.basis_store`). Solver defaults (``oversample=20``, ``tol=0.05``,
    ``exact_below=128``) were chosen with ``benchmarks/bench_detection.py``: ``tol`` only bounds the error of the
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
        _require(_is_int(self.top_k) and self.top_k > 0, "top_k", self.top_k, "an integer >= 1")
        _require(
            len(self.epsilons) > 0 and all(0 < e < 1 for e in self.epsilons),
            "epsilon",
            self.epsilon,
            "a number or list of numbers strictly between 0 and 1",
        )
        for name in ("compute_dtype", "basis_dtype"):
            allowed = ("float32", "float64") if name == "compute_dtype" else tuple(_DTYPES)
            _require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {allowed}")
        _require(self.mode in ("auto", "lora", "full"), "mode", self.mode, "one of ('auto', 'lora', 'full')")
        _require(
            self.effective_rank_method in ("exact", "estimate"),
            "effective_rank_method",
            self.effective_rank_method,
            "one of ('exact', 'estimate')",
        )
        _require(
            self.weight_copy_dtype in _DTYPES, "weight_copy_dtype", self.weight_copy_dtype, f"one of {tuple(_DTYPES)}"
        )
        _require(
            _is_int(self.exact_below) and self.exact_below >= 0, "exact_below", self.exact_below, "an integer >= 0"
        )
        _require(_is_int(self.oversample) and self.oversample >= 0, "oversample", self.oversample, "an integer >= 0")
        _require(
            isinstance(self.tol, (int, float)) and 0 < self.tol < 1,
            "tol",
            self.tol,
            "a number strictly between 0 and 1",
        )
        _require(_is_int(self.max_iter) and self.max_iter >= 1, "max_iter", self.max_iter, "an integer >= 1")
        _require(
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


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def _is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


class SpectralMonitor:
    """Measures intruder dimensions, effective rank and top singular values of every LoRA-merged weight.

    ``snapshot()`` computes the thin left singular basis of each pretrained weight (one full SVD per matrix, the
    slow part, done once); ``measure(step)`` then costs a few products with each weight per matrix.
    """

    def __init__(self, model: nn.Module, **options) -> None:
        self.config = SpectralConfig(**options)
        self.model = model
        cfg = self.config
        unreadable = unsupported_sharding(model)
        if unreadable:
            raise ValueError(f"lora-spectral-callback cannot monitor this model: {unreadable}")
        # auto: LoRA if the model has PEFT layers; a full fine-tune only when layers were named (copying every
        # weight of a model nobody asked about would be a nasty surprise)
        self.mode = cfg.mode
        if cfg.mode == "auto":
            self.mode = "lora" if has_peft_layers(model) or cfg.include is None else "full"
        self._store = BasisStore(_DTYPES[cfg.basis_dtype], cfg.basis_device, cfg.basis_cache_dir)
        self.matrices: list[MonitoredMatrix | DenseMatrix]
        if self.mode == "full":
            copy_device = "cpu" if self._store.on_disk else cfg.basis_device
            keep = self.keep_copy
            if module_is_sharded(model) and not is_main_process():
                keep = _shape_only  # only the main process measures a sharded model: gather each copy, keep none
            self.matrices = find_dense_matrices(
                model, cfg.include, cfg.exclude, _DTYPES[cfg.weight_copy_dtype], copy_device, keep
            )
            copied = sum(m.copy_bytes() for m in self.matrices)
            log = logger.warning if cfg.mode == "auto" else logger.info  # say so loudly if it was not asked for
            log(
                "lora-spectral-callback: %sfull fine-tuning mode: %d matrices, %.1f MB of pretrained weight copies%s",
                "no LoRA layer found, " if cfg.mode == "auto" else "",
                len(self.matrices),
                copied / 1e6,
                ", memory-mapped from disk" if self._store.on_disk else "",
            )
        else:
            self.matrices, skipped = find_lora_matrices(model, cfg.include, cfg.exclude)
            if skipped:
                logger.warning(
                    "lora-spectral-callback cannot measure these LoRA layers yet: %s", describe_skipped(skipped)
                )
        if not self.matrices:
            raise ValueError(_nothing_to_monitor(model, self.mode, cfg.include, cfg.exclude))
        self._basis: dict[str, Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._snapshot_errors: dict[str, tuple[type[Exception], str]] = {}
        self._warm_start: dict[str, KrylovSpace] = {}  # each matrix's last search space: the next one's start
        self._last_vectors: dict[str, Tensor] = {}  # top-k left singular vectors of the last measurement
        self._pretrained_sv: dict[str, Tensor] = {}  # singular values of each pretrained weight, from the snapshot
        self._generators: dict[torch.device, torch.Generator] = {}
        self._reported: set[tuple[str, str]] = set()

    # -- snapshot -------------------------------------------------------------------------------------------
    @property
    def keep_copy(self) -> Callable[[Tensor], Tensor] | None:
        """Where full fine-tuning mode keeps a pretrained weight copy: memory-mapped from disk when
        ``basis_device="disk"``, else as taken (None)."""
        return self._store.disk_copy if self._store.on_disk else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.config.compute_dtype]

    @property
    def sharded(self) -> bool:
        """Whether monitored weights are FSDP2 ``DTensor`` shards or ZeRO-3 partitions: then ``measure`` is a
        collective (every rank calls it). Checked live, so a model sharded after the monitor was built is handled
        too."""
        return any(module_is_sharded(m.module) for m in self.matrices)

    def snapshot(self) -> None:
        """Store the thin left singular basis of every monitored pretrained weight (idempotent).

        A layer whose snapshot fails (out of memory, NaN/Inf weight) is left out and retried at the next call;
        ``measure`` reports the reason under that layer (``strict=True`` re-raises instead). With sharded weights
        this does nothing: ``measure`` snapshots each matrix from the copy it gathers on every rank.
        """
        todo = [m for m in self.matrices if m.name not in self._basis]
        if not todo or self.sharded:
            return
        from tqdm.auto import tqdm

        for matrix in tqdm(todo, desc="spectral snapshot", disable=not self.config.progress, leave=False):
            self._snapshot_one(matrix)

    def _snapshot_one(self, matrix: MonitoredMatrix | CapturedMatrix | DenseMatrix) -> None:
        try:
            with torch.no_grad():
                W0 = matrix.base_weight().detach().to(self.compute_dtype)
                if not all_finite(W0):
                    raise _NonFinite("pretrained weight contains NaN or Inf")
                self._basis[matrix.name], self._pretrained_sv[matrix.name] = self._store.basis(W0)
                self._shapes[matrix.name] = W0.shape
                self._snapshot_errors.pop(matrix.name, None)
        except Exception as err:
            if self.config.strict and not isinstance(err, _NonFinite):
                raise
            # Kept as text: holding the exception would keep its traceback's (device) tensors alive.
            if isinstance(err, _NonFinite):
                self._snapshot_errors[matrix.name] = (_NonFinite, str(err))
            else:
                self._snapshot_errors[matrix.name] = (
                    RuntimeError,
                    f"pretrained snapshot failed: {type(err).__name__}: {err}",
                )

    def basis_bytes(self) -> int:
        """Memory held for the pretrained bases (0 when memory-mapped from disk: only droppable page cache)."""
        if self._store.on_disk:
            return 0
        return sum(b.numel() * b.element_size() for b in self._basis.values())

    # -- measurement ----------------------------------------------------------------------------------------
    def capture(self) -> list[CapturedMatrix | DenseMatrix]:
        """The current state of every monitored matrix, copied, to ``measure`` later (see ``background``)."""
        return [matrix.capture() for matrix in self.matrices]

    def measure(
        self, step: int | None = None, matrices: Sequence[MonitoredMatrix | CapturedMatrix] | None = None
    ) -> SpectralReport | None:
        """Measure every monitored matrix (or the ``capture()``-d copies given); a layer that fails is recorded in
        ``errors`` and skipped.

        With sharded weights (``sharded``: FSDP2, ZeRO-3) this is a **collective**: call it on every rank at the
        same step. Each matrix in turn is gathered on every rank (``capture()``: its full base weight and factors,
        one matrix in memory at a time) and measured on the main process only, which returns the report; the other
        ranks return None. Without sharding, call it wherever you like (the callback calls it on rank 0 only).
        """
        if matrices is None and self.sharded:
            return self._measure_gathered(step)
        self.snapshot()
        return self._measure(step, self.matrices if matrices is None else matrices, snapshot_each=self.sharded)

    def _measure_gathered(self, step: int | None) -> SpectralReport | None:
        """The collective measurement of a sharded model (see ``measure``). Every rank walks every matrix's gathers
        whatever happens on the main process (a failed layer, or a ``strict`` raise, drains the rest first), so
        the ranks stay in step."""
        gathered = self._gathered()
        if not is_main_process():
            for item in gathered:  # take part in every gather, measure nothing
                del item
            return None
        try:
            return self._measure(step, gathered, snapshot_each=True)
        finally:
            for item in gathered:  # only left over after a raise
                del item

    def _gathered(self) -> Iterator[CapturedMatrix | DenseMatrix | _GatherFailed]:
        """Each monitored matrix in turn, gathered on every rank; a failure after its gathers becomes an item, so
        every rank still goes on to the next matrix. One gathered matrix is alive at a time."""
        for matrix in self.matrices:
            try:
                item = matrix.capture()
            except Exception as err:
                item = _GatherFailed(matrix.name, matrix.module, f"{type(err).__name__}: {err}")
            yield item
            del item

    def _measure(
        self,
        step: int | None,
        matrices: Iterable[MonitoredMatrix | CapturedMatrix | DenseMatrix],
        snapshot_each: bool = False,
    ) -> SpectralReport:
        start = time.perf_counter()
        layers: dict[str, LayerReport] = {}
        errors: dict[str, str] = {}
        nonfinite: list[str] = []
        present = {id(module) for module in self.model.modules()}
        for matrix in matrices:
            if snapshot_each and matrix.name not in self._basis and not isinstance(matrix, _GatherFailed):
                self._snapshot_one(matrix)  # from the gathered copy (sharded weights): snapshot() skipped them
            try:
                if isinstance(matrix, _GatherFailed):
                    raise RuntimeError(f"gathering the sharded weights failed: {matrix.error}")
                if id(matrix.module) not in present:
                    raise RuntimeError("layer is no longer part of the model (removed or replaced since the snapshot)")
                if matrix.name in self._snapshot_errors:
                    kind, message = self._snapshot_errors[matrix.name]
                    raise kind(message)
                layers[matrix.name] = self.measure_matrix(matrix)
            except _NonFinite as err:
                nonfinite.append(matrix.name)
                errors[matrix.name] = str(err)
                self._log_once(matrix.name, "nonfinite", f"{matrix.name}: {err}")
            except Exception as err:  # monitoring must never take the training run down
                if self.config.strict:
                    raise
                errors[matrix.name] = f"{type(err).__name__}: {err}"
                self._log_once(
                    matrix.name,
                    type(err).__name__,
                    f"skipping {matrix.name} in this measurement: {errors[matrix.name]}",
                )
            del matrix  # a gathered copy goes before the next one is gathered
        return SpectralReport.from_layers(
            step, list(self.config.epsilons), layers, errors, nonfinite, time.perf_counter() - start
        )

    @torch.no_grad()
    def measure_matrix(self, matrix: MonitoredMatrix | CapturedMatrix | DenseMatrix) -> LayerReport:
        """Top-k singular triplets of one merged weight, their max |cos| with the pretrained basis, and ranks."""
        cfg = self.config
        t0 = time.perf_counter()
        svd, max_cos, uncertain = self.decompose(matrix)
        counts = count_intruders(max_cos, cfg.epsilons)
        rank = self._update_effective_rank(matrix, svd.U.device)
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

    def _update_effective_rank(
        self, matrix: MonitoredMatrix | CapturedMatrix | DenseMatrix, device: torch.device
    ) -> float:
        """Effective rank of the update: exact for LoRA (an r x r SVD); for a full fine-tune's dense update an
        exact float64 ``svdvals``, or the stochastic Lanczos estimate when ``effective_rank_method="estimate"``."""
        if isinstance(matrix, DenseMatrix) and self.config.effective_rank_method == "estimate":
            return estimate_effective_rank(matrix.update(device, self.compute_dtype), generator=self._generator(device))
        update_sv = matrix.update_singular_values(device)
        return effective_rank(update_sv) if update_sv is not None else 0.0

    @torch.no_grad()
    def decompose(self, matrix: MonitoredMatrix | CapturedMatrix | DenseMatrix) -> tuple[TopSVD, Tensor, int]:
        """The detection step shared by measurement and mitigation: top-k singular triplets of one merged weight
        (in ``compute_dtype``), each left vector's max |cos| with the pretrained basis, and how many of those
        cosines lie closer to a threshold than their error bound."""
        cfg = self.config
        basis = self._basis[matrix.name]
        W0 = matrix.base_weight().detach()
        if W0.shape != self._shapes[matrix.name]:
            raise ValueError(
                f"weight shape {tuple(W0.shape)} no longer matches the snapshot {tuple(self._shapes[matrix.name])}"
            )
        W0 = W0.to(self.compute_dtype)
        if not all_finite(W0):
            raise _NonFinite("base weight contains NaN or Inf")
        op = matrix.operator(W0)
        if op.B is not None and op.A is not None and not (all_finite(op.B) and all_finite(op.A)):
            raise _NonFinite("LoRA factors contain NaN or Inf")
        if op.row_scale is not None and not all_finite(op.row_scale):
            raise _NonFinite("DoRA row scale contains NaN or Inf")
        if isinstance(matrix, DenseMatrix) and not all_finite(op.W0):
            raise _NonFinite("fine-tuned weight contains NaN or Inf")

        slack = basis_rounding_error(basis.dtype)
        epsilons = torch.tensor(cfg.epsilons, dtype=W0.dtype, device=W0.device)

        def distance(max_cos: Tensor) -> Tensor:  # how far each cosine may move before a count flips
            return (max_cos[None, :] - epsilons[:, None]).abs().amin(dim=0) - slack

        cosines: dict[str, Tensor] = {}  # the solver's last margin check, reused below when it settled the answer

        def margin(U: Tensor) -> Tensor:
            cosines["U"], cosines["max_cos"] = U, max_abs_cosine(U, basis)
            return distance(cosines["max_cos"])

        if min(op.shape) <= cfg.exact_below:
            svd = exact_top_singular_triplets(op, cfg.top_k)
        else:
            start: Tensor | KrylovSpace | None = self._warm_start.get(matrix.name)
            if start is None or start.shape[0] != op.shape[0]:
                start = basis[:, : cfg.top_k + cfg.oversample].to(W0.device, W0.dtype)
            svd = top_singular_triplets(
                op,
                cfg.top_k,
                start,
                oversample=cfg.oversample,
                tol=cfg.tol,
                max_iter=cfg.max_iter,
                needed_accuracy=margin,
                generator=self._generator(W0.device),
            )
            self._warm_start[matrix.name] = svd.block
        self._last_vectors[matrix.name] = svd.U
        max_cos = cosines["max_cos"] if cosines.get("U") is svd.U else max_abs_cosine(svd.U, basis)
        if not torch.isfinite(svd.S).all():
            raise _NonFinite("merged weight has non-finite singular values")
        uncertain = int((distance(max_cos) < svd.error).sum())
        return svd, max_cos, uncertain

    @torch.no_grad()
    def spectra(self, names: Sequence[str] | None = None, n_pretrained: int | None = None) -> dict[str, LayerSpectra]:
        """|cos| matrix and pretrained spectrum of the last measurement of ``names`` (default: all measured), for
        pictures. ``n_pretrained`` (default ``2 * top_k``) pretrained vectors are compared; the pretrained
        singular values were kept from the snapshot's SVD, so no weight is read (nor, when sharded, gathered).
        """
        n = n_pretrained or 2 * self.config.top_k
        out: dict[str, LayerSpectra] = {}
        for name in self._last_vectors if names is None else names:
            U, basis = self._last_vectors[name], self._basis[name]
            cos = (basis[:, :n].to(U.device, U.dtype).T @ U).abs().T  # (k, n)
            out[name] = LayerSpectra(cos.tolist(), self._pretrained_sv[name][:n].tolist())
        return out

    def _generator(self, device: torch.device) -> torch.Generator:
        """A private seeded generator per device: random fill never advances the global RNG."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[device]

    def _log_once(self, name: str, kind: str, message: str) -> None:
        if (name, kind) not in self._reported:
            self._reported.add((name, kind))
            logger.warning("lora-spectral-callback: %s", message)


def _nothing_to_monitor(model: nn.Module, mode: str, include: str | None, exclude: str | None) -> str:
    """Why no layer was selected: filters that match none of the candidate layers (listed), or nothing to watch."""
    if include or exclude:
        if mode == "full":
            available = [name for name, _ in dense_layers(model)]
        else:
            available = [m.name for m in find_lora_matrices(model)[0]]
        if available:
            shown = ", ".join(available[:6]) + (f", ... ({len(available)} in all)" if len(available) > 6 else "")
            kind = "LoRA layers" if mode == "lora" else "Linear/Conv1D/Embedding/conv layers"
            return (
                f"include={include!r} exclude={exclude!r} match none of the model's {kind}: "
                f"must select at least one of: {shown}"
            )
    if mode == "full":
        return "No Linear/Conv1D/Embedding/conv layer to monitor in this model."
    return (
        "No LoRA layer to monitor: wrap the model with peft.get_peft_model(...) and a LoraConfig first, "
        "or monitor a full fine-tune by naming its layers: include=<regex>, mode='full'."
    )


@dataclass
class _GatherFailed:
    """Stands in for a matrix whose gathered copy could not be made (the gathers themselves ran)."""

    name: str
    module: nn.Module
    error: str


def _shape_only(copy: Tensor) -> Tensor:
    """What a rank that never measures keeps of a pretrained copy: its shape and dtype."""
    return torch.empty(copy.shape, dtype=copy.dtype, device="meta")


class _NonFinite(ValueError):
    """NaN/Inf in the weights: a real training failure, reported as such rather than as a monitoring error."""
