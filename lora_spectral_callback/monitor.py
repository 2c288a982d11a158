"""SpectralMonitor: snapshot the pretrained bases once, then measure the merged LoRA weights on demand.

Usable on its own in any training loop (plain PyTorch, accelerate); the Trainer callback is a thin scheduler
around it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .background import Worker
from .basis_store import BasisStore
from .distributed import all_gather_objects, balanced_owners, is_main_process, rank_and_world
from .full_finetune import DenseMatrix, dense_layers, find_dense_matrices
from .guard import FaultGuard
from .layers import describe_skipped, find_lora_matrices, has_peft_layers
from .linalg import KrylovSpace, TopSVD, exact_top_singular_triplets, top_singular_triplets
from .matrix import WeightMatrix
from .metrics import (
    all_finite,
    basis_rounding_error,
    count_intruders,
    effective_rank,
    estimate_effective_rank,
    first_intruder_position,
    intruder_energy_share,
    intruder_sigma_ratio,
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
            reports are combined on the main process; ``measure`` is then a collective (call it on every rank). The callback turns it on unless
            ``asynchronous``.

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
        modes = ("auto", "background", "blocking")
        _require(self.snapshot in modes, "snapshot", self.snapshot, f"one of {modes}")
        _require(
            isinstance(self.background_after, (int, float)) and self.background_after >= 0,
            "background_after",
            self.background_after,
            "a number of seconds >= 0",
        )
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


@dataclass
class LayerState:
    """What the monitor keeps about one matrix between measurements."""

    basis: Tensor | None = None  # thin left singular basis of the pretrained weight (basis_dtype, basis_device)
    pretrained_sv: Tensor | None = None  # its singular values (float64, CPU), from the same SVD: pictures
    shape: torch.Size | None = None  # the pretrained weight's shape: a layer that changed shape is refused
    snapshot_error: tuple[type[Exception], str] | None = None  # why the snapshot failed (retried next snapshot)
    warm_start: KrylovSpace | None = None  # the last measurement's search space: seeds the next one
    last_vectors: Tensor | None = None  # the last top-k left singular vectors: pictures


class SpectralMonitor:
    """Measures intruder dimensions, effective rank and top singular values of every LoRA-merged weight.

    ``snapshot()`` computes the thin left singular basis of each pretrained weight (one full SVD per matrix, the
    slow part, done once); ``measure(step)`` then costs a few products with each weight per matrix.

    Args:
        model: The model: a PEFT model in LoRA mode, any ``nn.Module`` in full fine-tuning mode.
        **options (Any): :class:`SpectralConfig` fields.

    Raises:
        ValueError: A bad option, a filter that selects nothing, a model without monitorable layers, or FSDP1.
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
        self.matrices: list[WeightMatrix]
        if self.mode == "full":
            copy_device = "cpu" if self._store.on_disk else cfg.basis_device
            keep = self.keep_copy
            if module_is_sharded(model) and not is_main_process():
                keep = _shape_only  # only the main process measures a sharded model: gather each copy, keep none
            dense = find_dense_matrices(
                model, cfg.include, cfg.exclude, _DTYPES[cfg.weight_copy_dtype], copy_device, keep
            )
            self.matrices = list(dense)
            copied = sum(m.copy_bytes() for m in dense)
            log = logger.warning if cfg.mode == "auto" else logger.info  # say so loudly if it was not asked for
            log(
                "lora-spectral-callback: %sfull fine-tuning mode: %d matrices, %.1f MB of pretrained weight copies%s",
                "no LoRA layer found, " if cfg.mode == "auto" else "",
                len(self.matrices),
                copied / 1e6,
                ", memory-mapped from disk" if self._store.on_disk else "",
            )
        else:
            lora, skipped = find_lora_matrices(model, cfg.include, cfg.exclude)
            self.matrices = list(lora)
            if skipped:
                logger.warning(
                    "lora-spectral-callback cannot measure these adapter layers yet: %s", describe_skipped(skipped)
                )
        if not self.matrices:
            raise ValueError(_nothing_to_monitor(model, self.mode, cfg.include, cfg.exclude))
        self._layers = {m.name: LayerState() for m in self.matrices}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._guard = FaultGuard(cfg.strict)
        self._snapshot_worker: Worker[None] | None = None
        self._owned: list[WeightMatrix] | None = None  # this rank's share when split across ranks (see _share)

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

    @property
    def device(self) -> torch.device:
        """Where the monitored weights live (the first matrix's parameters): background work runs there."""
        return next(self.matrices[0].module.parameters()).device

    def snapshot(self, wait: bool = True) -> None:
        """Store the thin left singular basis of every monitored pretrained weight (idempotent).

        ``wait=False`` computes it on a background thread and returns at once (see ``measure`` for what is reported
        meanwhile); ``wait=True`` returns when every basis is there, also after a background start. A layer whose
        snapshot fails (out of memory, NaN/Inf weight) is left out and retried at the next call; ``measure`` reports
        the reason under that layer (``strict=True`` re-raises instead). With sharded weights this does nothing:
        ``measure`` snapshots each matrix from the copy it gathers on every rank.
        """
        if self.sharded:
            return
        worker = self._snapshot_worker
        if worker is not None:
            if not wait and not worker.done:
                return
            self._snapshot_worker = None
            worker.result()  # a strict failure in the worker is raised here
        self._snapshot(self._unsnapshotted(), wait)

    def start(self) -> None:
        """Take the snapshot as ``config.snapshot`` says (see :class:`SpectralConfig`): the callback calls this at
        train begin so that the one-time SVDs never stall a large model's first steps."""
        todo = self._unsnapshotted()
        if self.sharded or not todo:
            return
        background = self.config.snapshot == "background"
        if self.config.snapshot == "auto":
            start = time.perf_counter()
            self._snapshot_one(todo[0])
            todo = todo[1:]
            background = (time.perf_counter() - start) * len(todo) > self.config.background_after
        self._snapshot(todo, wait=not background)

    def _unsnapshotted(self) -> list[WeightMatrix]:
        return [m for m in self._share() if self._layers[m.name].basis is None]

    @property
    def collective(self) -> bool:
        """Whether ``measure`` must be called on every rank at the same step: sharded weights, or
        ``split_across_ranks`` in a multi-process run."""
        return self.sharded or self.split

    @property
    def split(self) -> bool:
        """Whether each rank snapshots and measures its own share of the matrices (``split_across_ranks`` in a
        multi-process LoRA run; a full fine-tune's pretrained copies live on the main process)."""
        return self.config.split_across_ranks and self.mode == "lora" and rank_and_world()[1] > 1 and not self.sharded

    def _share(self) -> list[WeightMatrix]:
        """The matrices this process snapshots and measures: when split across ranks, a share balanced by the cost
        of a snapshot (``m n min(m, n)``, the slow part), the same on every rank; decided once."""
        if not self.split:
            return self.matrices
        if self._owned is None:
            rank, world = rank_and_world()
            with torch.no_grad():
                shapes = [matrix.base_weight().shape for matrix in self.matrices]
            owners = balanced_owners([m * n * min(m, n) for m, n in shapes], world)
            self._owned = [matrix for matrix, owner in zip(self.matrices, owners, strict=True) if owner == rank]
        return self._owned

    def _snapshot(self, todo: list[WeightMatrix], wait: bool) -> None:
        if not todo:
            return
        if wait:
            self._snapshot_all(todo, self.config.progress)
        else:
            self._snapshot_worker = Worker(
                "lora-spectral-snapshot", lambda: self._snapshot_all(todo, False), self.device
            )

    @property
    def snapshot_pending(self) -> bool:
        """A background snapshot is still running."""
        return self._snapshot_worker is not None and not self._snapshot_worker.done

    def _snapshot_all(self, todo: list[WeightMatrix], progress: bool) -> None:
        from tqdm.auto import tqdm

        for matrix in tqdm(todo, desc="spectral snapshot", disable=not progress, leave=False):
            self._snapshot_one(matrix)

    def _snapshot_one(self, matrix: WeightMatrix) -> None:
        state = self._layers[matrix.name]
        try:
            with torch.no_grad():
                W0 = matrix.base_weight().detach().to(self.compute_dtype)
                if not all_finite(W0):
                    raise _NonFinite("pretrained weight contains NaN or Inf")
                basis, sv = self._store.basis(W0)
                state.shape, state.pretrained_sv, state.snapshot_error = W0.shape, sv, None
                state.basis = basis  # last: a measurement on another thread takes a basis as "snapshot complete"
        except Exception as err:
            if self.config.strict and not isinstance(err, _NonFinite):
                raise
            # Kept as text: holding the exception would keep its traceback's (device) tensors alive.
            if isinstance(err, _NonFinite):
                state.snapshot_error = (_NonFinite, str(err))
            else:
                state.snapshot_error = (
                    RuntimeError,
                    f"pretrained snapshot failed: {type(err).__name__}: {err}",
                )

    def basis_bytes(self) -> int:
        """Memory held for the pretrained bases (0 when memory-mapped from disk: only droppable page cache)."""
        if self._store.on_disk:
            return 0
        return sum(s.basis.numel() * s.basis.element_size() for s in self._layers.values() if s.basis is not None)

    # -- measurement ----------------------------------------------------------------------------------------
    def capture(self) -> list[WeightMatrix]:
        """The current state of every monitored matrix, copied, to ``measure`` later (see ``background``)."""
        return [matrix.capture() for matrix in self.matrices]

    def measure(self, step: int | None = None, matrices: Sequence[WeightMatrix] | None = None) -> SpectralReport | None:
        """Measure every monitored matrix (or the ``capture()``-d copies given); a layer that fails is recorded in
        ``errors`` and skipped.

        While a background snapshot (``snapshot(wait=False)``) runs, nothing waits for it: a layer whose basis is not
        there yet is listed in ``pending``, unless its update is still exactly zero (a LoRA fine-tune at step 0):
        then the merged weight *is* the pretrained one, and the layer is reported exactly, with no intruders and
        max |cos| 1, without a basis (and without singular values).

        When ``collective`` is true, call it on every rank at the same step; the main process returns the report,
        the other ranks None. With sharded weights (``sharded``: FSDP2, ZeRO-3) each matrix in turn is gathered on
        every rank (``capture()``: its full base weight and factors, one matrix in memory at a time) and measured on
        the main process. With ``split_across_ranks`` each rank measures its share and the layer reports are
        gathered (a strict failure on one rank raises on all of them, so none waits forever). Otherwise call it
        wherever you like (the callback calls it on rank 0 only).
        """
        if matrices is None and self.sharded:
            return self._measure_gathered(step)
        self.snapshot(wait=self._snapshot_worker is None)
        if matrices is None and self.split:
            return self._measure_split(step)
        return self._measure(step, self.matrices if matrices is None else matrices, snapshot_each=self.sharded)

    def _measure_split(self, step: int | None) -> SpectralReport | None:
        """Each rank measures its share; the layer reports are combined on the main process, in model order."""
        start = time.perf_counter()
        try:
            local: SpectralReport | str = self._measure(step, self._share())
        except Exception as err:  # strict: every rank must still reach the gather, then all raise
            local = f"{type(err).__name__}: {err}"
        parts = all_gather_objects(local)
        failures = [f"rank {rank}: {part}" for rank, part in enumerate(parts) if isinstance(part, str)]
        if failures:
            raise RuntimeError("measurement failed on " + "; ".join(failures))
        if not is_main_process():
            return None
        reports = [part for part in parts if isinstance(part, SpectralReport)]
        measured = {name: layer for r in reports for name, layer in r.layers.items()}
        layers = {m.name: measured[m.name] for m in self.matrices if m.name in measured}
        return SpectralReport.from_layers(
            step,
            list(self.config.epsilons),
            layers,
            {name: error for r in reports for name, error in r.errors.items()},
            [name for r in reports for name in r.nonfinite_layers],
            time.perf_counter() - start,
            [name for r in reports for name in r.pending],
        )

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

    def _gathered(self) -> Iterator[WeightMatrix | _GatherFailed]:
        """Each monitored matrix in turn, gathered on every rank; a failure after its gathers becomes an item, so
        every rank still goes on to the next matrix. One gathered matrix is alive at a time."""
        for matrix in self.matrices:
            item: WeightMatrix | _GatherFailed
            try:
                item = matrix.capture()
            except Exception as err:
                item = _GatherFailed(matrix.name, matrix.module, f"{type(err).__name__}: {err}")
            yield item
            del item

    def _measure(
        self,
        step: int | None,
        matrices: Iterable[WeightMatrix | _GatherFailed],
        snapshot_each: bool = False,
    ) -> SpectralReport:
        start = time.perf_counter()
        layers: dict[str, LayerReport] = {}
        errors: dict[str, str] = {}
        nonfinite: list[str] = []
        pending: list[str] = []
        present = {id(module) for module in self.model.modules()}
        for matrix in matrices:
            state = self._layers[matrix.name]
            if snapshot_each and state.basis is None and not isinstance(matrix, _GatherFailed):
                self._snapshot_one(matrix)  # from the gathered copy (sharded weights): snapshot() skipped them
            try:
                if isinstance(matrix, _GatherFailed):
                    raise RuntimeError(f"gathering the sharded weights failed: {matrix.error}")
                if id(matrix.module) not in present:
                    raise RuntimeError("layer is no longer part of the model (removed or replaced since the snapshot)")
                if state.snapshot_error is not None:
                    kind, message = state.snapshot_error
                    raise kind(message)
                if state.basis is None:  # a background snapshot has not reached this layer yet
                    if self._unchanged(matrix):
                        layers[matrix.name] = self._unchanged_report()
                    else:
                        pending.append(matrix.name)
                    continue
                layers[matrix.name] = self.measure_matrix(matrix)
            except _NonFinite as err:
                nonfinite.append(matrix.name)
                errors[matrix.name] = str(err)
                self._guard.warn_once((matrix.name, "nonfinite"), f"{matrix.name}: {err}")
            except Exception as err:  # monitoring must never take the training run down
                if self.config.strict:
                    raise
                errors[matrix.name] = f"{type(err).__name__}: {err}"
                message = f"skipping {matrix.name} in this measurement: {errors[matrix.name]}"
                self._guard.warn_once((matrix.name, type(err).__name__), message)
            del matrix  # a gathered copy goes before the next one is gathered
        return SpectralReport.from_layers(
            step, list(self.config.epsilons), layers, errors, nonfinite, time.perf_counter() - start, pending
        )

    def _unchanged(self, matrix: WeightMatrix) -> bool:
        """Whether the merged weight is exactly the pretrained one (no update yet, as at step 0 of LoRA)."""
        W0 = matrix.base_weight().detach().to(self.compute_dtype)
        op = matrix.operator(W0)
        if op.row_scale is not None:  # DoRA's m / ||W0||_row is 1 only up to rounding
            return False
        if op.W0 is not W0:  # a dense merged weight (full fine-tuning)
            return torch.equal(op.W0, W0)
        return op.B is None or op.A is None or not bool(op.B.any()) or not bool(op.A.any())

    def _unchanged_report(self) -> LayerReport:
        """What the paper's Alg. 1 gives for a merged weight equal to the pretrained one: its top singular vectors
        are pretrained ones (max |cos| 1), so no intruders; the update is zero (effective rank 0)."""
        cfg = self.config
        return LayerReport(
            intruders=0,
            intruders_by_epsilon={_eps_key(e): 0 for e in cfg.epsilons},
            max_cos=[1.0] * cfg.top_k,
            singular_values=[],
            effective_rank=0.0,
            pretrained_sigma1=math.nan,  # no snapshot yet
            intruder_energy_share=0.0,
            intruder_sigma_ratio=0.0,
            first_intruder=cfg.top_k + 1,
        )

    @torch.no_grad()
    def measure_matrix(self, matrix: WeightMatrix) -> LayerReport:
        """Top-k singular triplets of one merged weight, their max |cos| with the pretrained basis, and ranks."""
        cfg = self.config
        t0 = time.perf_counter()
        svd, max_cos, uncertain = self.decompose(matrix)
        counts = count_intruders(max_cos, cfg.epsilons)
        rank = self._update_effective_rank(matrix, svd.U.device)
        pretrained_sv = self._layers[matrix.name].pretrained_sv
        assert pretrained_sv is not None  # decompose() found the snapshot
        sigma1 = float(pretrained_sv[0]) if pretrained_sv.numel() else 0.0  # kept from the snapshot SVD
        return LayerReport(
            intruders=counts[cfg.epsilons[0]],
            intruders_by_epsilon={_eps_key(e): n for e, n in counts.items()},
            max_cos=max_cos.tolist(),
            singular_values=svd.S.tolist(),
            effective_rank=rank,
            pretrained_sigma1=sigma1,
            intruder_energy_share=intruder_energy_share(svd.S, max_cos, cfg.epsilons[0]),
            intruder_sigma_ratio=intruder_sigma_ratio(svd.S, max_cos, cfg.epsilons[0], sigma1),
            first_intruder=first_intruder_position(max_cos, cfg.epsilons[0]),
            converged=svd.converged,
            iterations=svd.iterations,
            uncertain=uncertain,
            seconds=time.perf_counter() - t0,
        )

    def _update_effective_rank(self, matrix: WeightMatrix, device: torch.device) -> float:
        """Effective rank of the update: exact for LoRA (an r x r SVD); for a full fine-tune's dense update an
        exact float64 ``svdvals``, or the stochastic Lanczos estimate when ``effective_rank_method="estimate"``."""
        if isinstance(matrix, DenseMatrix) and self.config.effective_rank_method == "estimate":
            return estimate_effective_rank(matrix.update(device, self.compute_dtype), generator=self._generator(device))
        update_sv = matrix.update_singular_values(device)
        return effective_rank(update_sv) if update_sv is not None else 0.0

    @torch.no_grad()
    def decompose(self, matrix: WeightMatrix) -> tuple[TopSVD, Tensor, int]:
        """The detection step shared by measurement and mitigation: top-k singular triplets of one merged weight
        (in ``compute_dtype``), each left vector's max |cos| with the pretrained basis, and how many of those
        cosines lie closer to a threshold than their error bound."""
        cfg = self.config
        state = self._layers[matrix.name]
        basis = state.basis
        if basis is None or state.shape is None:
            raise RuntimeError("no pretrained snapshot of this layer: call snapshot() first")
        W0 = matrix.base_weight().detach()
        if W0.shape != state.shape:
            raise ValueError(f"weight shape {tuple(W0.shape)} no longer matches the snapshot {tuple(state.shape)}")
        W0 = W0.to(self.compute_dtype)
        if not all_finite(W0):
            raise _NonFinite("base weight contains NaN or Inf")
        op = matrix.operator(W0)
        if op.B is not None and op.A is not None and not (all_finite(op.B) and all_finite(op.A)):
            raise _NonFinite("LoRA factors contain NaN or Inf")
        if op.row_scale is not None and not all_finite(op.row_scale):
            raise _NonFinite("DoRA row scale contains NaN or Inf")
        if op.W0 is not W0 and not all_finite(op.W0):  # a dense merged weight (full fine-tuning)
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
            start: Tensor | KrylovSpace | None = state.warm_start
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
            state.warm_start = svd.block
        state.last_vectors = svd.U
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
        measured = [name for name, state in self._layers.items() if state.last_vectors is not None]
        for name in measured if names is None else names:
            state = self._layers[name]
            U, basis, sv = state.last_vectors, state.basis, state.pretrained_sv
            if U is None or basis is None or sv is None:
                raise ValueError(f"layer {name!r} has not been measured yet")
            cos = (basis[:, :n].to(U.device, U.dtype).T @ U).abs().T  # (k, n)
            out[name] = LayerSpectra(cos.tolist(), sv[:n].tolist())
        return out

    def _generator(self, device: torch.device) -> torch.Generator:
        """A private seeded generator per device: random fill never advances the global RNG."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[device]


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
