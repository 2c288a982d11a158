"""SpectralMonitor: snapshot the pretrained bases once, then measure the merged LoRA weights on demand.

Usable on its own in any training loop (plain PyTorch, accelerate); the Trainer callback is a thin scheduler
around it. The monitor wires the rooms below together: :mod:`.config` (options), :mod:`.discovery` (which
matrices), :mod:`.snapshot` (the pretrained bases), :mod:`.measure` (one measurement) and :mod:`.ranks` (the work
split across processes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .basis_store import BasisStore
from .config import DTYPES, SpectralConfig
from .discovery import dense_layers, find_matrices, monitoring_mode
from .distributed import all_gather_objects, balanced_owners, is_main_process, rank_and_world
from .full_finetune import Keep
from .guard import FaultGuard
from .layout import matrix_shape
from .matrix import WeightMatrix
from .measure import Decomposition, Measurer
from .ranks import all_or_raise, combine_reports, gathered, rounds, shape_only, snapshot_costs
from .report import LayerReport, LayerSpectra, SpectralReport
from .sharding import module_is_sharded
from .snapshot import LayerState, Snapshots

__all__ = ["SpectralConfig", "SpectralMonitor"]


class SpectralMonitor:
    """Measures intruder dimensions, effective rank and top singular values of every LoRA-merged weight.

    ``snapshot()`` computes the thin left singular basis of each pretrained weight (one full SVD per matrix, the
    slow part, done once); ``measure(step)`` then costs a few products with each weight per matrix.

    Args:
        model: The model: a PEFT model in LoRA mode, any ``nn.Module`` in full fine-tuning mode.
        config: A checked :class:`SpectralConfig`; or give its fields as keyword options instead.
        **options (Any): :class:`SpectralConfig` fields.

    Raises:
        ValueError: A bad option, a filter that selects nothing, a model without monitorable layers, or FSDP1.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> _ = torch.manual_seed(0)
        >>> base = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
        >>> model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"]))
        >>> monitor = SpectralMonitor(model, top_k=10, epsilon=0.5, progress=False)
        >>> monitor.snapshot()
        >>> monitor.measure(step=0).intruders_total  # B = 0 at init: nothing has moved yet
        0
        >>> with torch.no_grad():  # a large rank-4 update, as a runaway fine-tune makes
        ...     for name, p in model.named_parameters():
        ...         if "lora_B" in name:
        ...             _ = p.normal_(std=5.0)
        >>> report = monitor.measure(step=1)
        >>> report.intruders_total  # its 4 directions now lead both spectra, away from every pretrained one
        8
    """

    def __init__(self, model: nn.Module, config: SpectralConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ValueError("give SpectralMonitor either a SpectralConfig or its fields as keyword options, not both")
        self.config = cfg = config if config is not None else SpectralConfig(**options)
        self.model = model
        store = BasisStore(DTYPES[cfg.basis_dtype], cfg.basis_device, cfg.basis_cache_dir)
        keep: Keep | None = store.disk_copy if store.on_disk else None
        copy_device = "cpu" if store.on_disk else cfg.basis_device
        self.mode, self.matrices = find_matrices(model, cfg, _owned_copies(model, cfg, keep), copy_device)
        self.snapshots = Snapshots([m.name for m in self.matrices], cfg, store)
        self.measurer = Measurer(cfg, self.snapshots.layers, FaultGuard(cfg.strict))
        self._owner: list[int] | None = None  # the rank of each matrix (see owners)
        # full mode decided where its pretrained copies live once, now; LoRA mode follows the sharding live
        self._split_copies = _splits(cfg, module_is_sharded(model)) if self.mode == "full" else None

    @property
    def keep_copy(self) -> Keep | None:
        """Where full fine-tuning mode keeps a pretrained weight copy: memory-mapped from disk when
        ``basis_device="disk"``, else as taken (None)."""
        store = self.snapshots.store
        return store.disk_copy if store.on_disk else None

    @property
    def sharded(self) -> bool:
        """Whether monitored weights are FSDP2 ``DTensor`` shards or ZeRO-3 partitions: then ``measure`` is a
        collective (every rank calls it). Checked live, so a model sharded after the monitor was built is handled
        too."""
        return any(module_is_sharded(m.module) for m in self.matrices)

    @property
    def split(self) -> bool:
        """Whether each rank snapshots and measures its own share of the matrices (and, in full fine-tuning mode,
        keeps only their pretrained copies): a multi-process run with sharded weights, or with whole weights and
        ``split_across_ranks`` (in full fine-tuning mode, as it was when the monitor took the copies)."""
        if self._split_copies is not None:
            return self._split_copies
        return _splits(self.config, self.sharded)

    @property
    def collective(self) -> bool:
        """Whether ``measure`` must be called on every rank at the same step: sharded weights, or a split."""
        return self.sharded or self.split

    @property
    def device(self) -> torch.device:
        """Where the monitored weights live (the first matrix's parameters): background work runs there."""
        return next(self.matrices[0].module.parameters()).device

    # -- snapshot -------------------------------------------------------------------------------------------
    def snapshot(self, wait: bool = True) -> None:
        """Store the thin left singular basis of every monitored pretrained weight (idempotent).

        ``wait=False`` computes it on a background thread and returns at once (see ``measure`` for what is reported
        meanwhile); ``wait=True`` returns when every basis is there, also after a background start. A layer whose
        snapshot fails (out of memory, NaN/Inf weight) is left out and retried at the next call; ``measure`` reports
        the reason under that layer (``strict=True`` re-raises instead). With sharded weights this does nothing:
        ``measure`` snapshots each matrix from the copy it gathers on every rank.
        """
        if self.sharded or not self.snapshots.join(wait):
            return
        self.snapshots.take_all(self.snapshots.missing(self._share()), wait, self.device)

    def start(self) -> None:
        """Take the snapshot as ``config.snapshot`` says (see :class:`SpectralConfig`): the callback calls this at
        train begin so that the one-time SVDs never stall a large model's first steps."""
        if not self.sharded:
            self.snapshots.start(self.snapshots.missing(self._share()), self.device)

    @property
    def snapshot_pending(self) -> bool:
        """A background snapshot is still running."""
        return self.snapshots.pending

    def basis_bytes(self) -> int:
        """Memory held for the pretrained bases (0 when memory-mapped from disk: only droppable page cache)."""
        return self.snapshots.basis_bytes()

    @property
    def owners(self) -> list[int]:
        """The rank that snapshots and measures each matrix: shares balanced by the cost of a snapshot
        (:func:`.ranks.snapshot_costs`), decided once, the same on every rank without communicating; all 0 when
        not split."""
        if self._owner is None:
            world = rank_and_world()[1] if self.split else 1
            self._owner = balanced_owners(snapshot_costs(self.matrices), world)
        return self._owner

    def _share(self) -> list[WeightMatrix]:
        """The matrices this process snapshots and measures: all of them, or its share when split."""
        if not self.split:
            return self.matrices
        rank = rank_and_world()[0]
        return [matrix for matrix, owner in zip(self.matrices, self.owners, strict=True) if owner == rank]

    # -- measurement ----------------------------------------------------------------------------------------
    def capture(self) -> list[WeightMatrix]:
        """The current state of every monitored matrix, copied, to ``measure`` later (see :mod:`.background`)."""
        return [matrix.capture() for matrix in self.matrices]

    def measure(self, step: int | None = None, matrices: Sequence[WeightMatrix] | None = None) -> SpectralReport | None:
        """Measure every monitored matrix (or the ``capture()``-d copies given); a layer that fails is recorded in
        ``errors`` and skipped.

        While a background snapshot (``snapshot(wait=False)``) runs, nothing waits for it: a layer whose basis is not
        there yet is listed in ``pending``, unless its update is still exactly zero (a LoRA fine-tune at step 0):
        then the merged weight *is* the pretrained one, and the layer is reported exactly, with no intruders and
        max |cos| 1, without a basis (and without singular values).

        When ``collective`` is true, call it on every rank at the same step; the main process returns the report,
        the other ranks None. When ``split``, each rank snapshots and measures its share of the matrices (``owners``)
        and the layer reports are gathered; a strict failure on one rank raises on all of them, so none waits
        forever. With sharded weights (``sharded``: FSDP2, ZeRO-3) the matrices are gathered (``capture()``: the
        full weights and factors) in rounds of one matrix per rank, in the same order on every rank, each rank
        keeping and measuring its own while the others measure theirs. Otherwise call it wherever you like (the
        callback calls it on rank 0 only).
        """
        if matrices is None and self.sharded:
            return self._measure_rounds(step)
        self.snapshot(wait=not self.snapshots.in_background)
        if matrices is None and self.split:
            return self._measure_split(step)
        snapshot = self.snapshots.take if self.sharded else None
        return self.measurer.walk(step, self.matrices if matrices is None else matrices, self.model, snapshot)

    def _measure_split(self, step: int | None) -> SpectralReport | None:
        """Each rank measures its share of the whole weights; the layer reports are combined on the main process."""
        start = time.perf_counter()
        try:
            local: SpectralReport | str = self.measurer.walk(step, self._share(), self.model)
        except Exception as err:  # strict: every rank must still reach the gather, then all raise
            local = f"{type(err).__name__}: {err}"
        parts = all_or_raise(local, "measurement")
        return self._combined(parts, step, start)

    def _measure_rounds(self, step: int | None) -> SpectralReport | None:
        """The collective measurement of a sharded model split across ranks, in rounds (:func:`.ranks.rounds`):
        every rank joins the gathers of a round's matrices, in the same order, keeps the one it owns, snapshots it
        the first time and measures it while the other ranks measure theirs; then the round's layer reports are
        exchanged (a ``strict`` failure raises on every rank there). A rank waits at most one round for the others."""
        start = time.perf_counter()
        rank, world = rank_and_world()
        owner = self.owners
        parts: list[SpectralReport] = []
        for members in rounds(owner, snapshot_costs(self.matrices), world):
            items = gathered([self.matrices[i] for i in members], [owner[i] for i in members])
            mine = [item for i, item in zip(members, items, strict=True) if owner[i] == rank]
            try:
                local: SpectralReport | str = self.measurer.walk(step, mine, self.model, self.snapshots.take)
            except Exception as err:  # strict: every rank must still reach the exchange, then all raise
                local = f"{type(err).__name__}: {err}"
            del mine
            parts.extend(all_or_raise(local, "measurement"))
        return self._combined(parts, step, start)

    def _combined(self, parts: list[SpectralReport], step: int | None, start: float) -> SpectralReport | None:
        """The ranks' reports as one on the main process; None elsewhere."""
        if not is_main_process():
            return None
        return combine_reports(parts, step, [m.name for m in self.matrices], self.config.epsilons, start)

    def measure_matrix(self, matrix: WeightMatrix) -> LayerReport:
        """Measure one monitored matrix (its snapshot must be there): a :class:`~.report.LayerReport`."""
        return self.measurer.layer(matrix)

    def decompose(self, matrix: WeightMatrix) -> Decomposition:
        """The detection step for one monitored matrix, as :func:`.measure.decompose`, against its snapshot."""
        return self.measurer.decompose(matrix)

    @torch.no_grad()
    def spectra(self, names: Sequence[str] | None = None, n_pretrained: int | None = None) -> dict[str, LayerSpectra]:
        """|cos| matrix and pretrained spectrum of the last measurement of ``names`` (default: all measured), for
        pictures. ``n_pretrained`` (default ``2 * top_k``) pretrained vectors are compared; the pretrained
        singular values were kept from the snapshot's SVD, so no weight is read (nor, when sharded, gathered).

        When split across ranks each rank holds the last vectors of its own share, so this is a collective like
        ``measure``: the main process's ``names`` count, every rank sends the pictures of its layers, and the main
        process returns them all (the others an empty dict).
        """
        n = n_pretrained or 2 * self.config.top_k
        layers = self.snapshots.layers
        if not self.split:
            return _spectra_of(layers, names, n)
        names = all_gather_objects(names)[0]  # the main process decides which layers
        owned = [m.name for m in self._share() if layers[m.name].last_vectors is not None]
        try:
            local: dict[str, LayerSpectra] | str = _spectra_of(
                layers, owned if names is None else [name for name in names if name in owned], n
            )
        except Exception as err:  # every rank must still reach the gather, then all raise
            local = f"{type(err).__name__}: {err}"
        parts = all_or_raise(local, "pictures")
        if not is_main_process():
            return {}
        drawn = {name: s for part in parts if isinstance(part, dict) for name, s in part.items()}
        order = [m.name for m in self.matrices if m.name in drawn] if names is None else list(names)
        missing = [name for name in order if name not in drawn]
        if missing:
            raise ValueError(f"layer {missing[0]!r} has not been measured yet")
        return {name: drawn[name] for name in order}


def _splits(config: SpectralConfig, sharded: bool) -> bool:
    """Whether a run splits the monitor's work across its ranks: with sharded weights whenever there are several
    ranks (each measurement gathers on every rank anyway), with whole weights when ``split_across_ranks``."""
    return rank_and_world()[1] > 1 and (config.split_across_ranks or sharded)


def _owned_copies(model: nn.Module, config: SpectralConfig, keep: Keep | None) -> Keep | None:
    """Where a multi-process full fine-tune keeps each pretrained copy on this rank: as ``keep`` says on the rank
    that owns the matrix (``SpectralMonitor.owners``, from the same shapes and order; rank 0 owns all when not
    split), only its shape elsewhere. Copies are taken on every rank (a sharded weight's gather is a collective)."""
    rank, world = rank_and_world()
    if world == 1 or monitoring_mode(model, config) != "full":
        return keep
    shapes = [matrix_shape(module) for _, module in dense_layers(model, config.include, config.exclude)]
    costs = [m * n * min(m, n) for m, n in shapes]
    owned = iter(balanced_owners(costs, world if _splits(config, module_is_sharded(model)) else 1))

    def kept(copy: Tensor) -> Tensor:
        if next(owned) != rank:
            return shape_only(copy)
        return copy if keep is None else keep(copy)

    return kept


def _spectra_of(layers: dict[str, LayerState], names: Sequence[str] | None, n: int) -> dict[str, LayerSpectra]:
    """The pictures of ``names`` (default: every measured layer) from the states this process holds."""
    measured = [name for name, state in layers.items() if state.last_vectors is not None]
    out: dict[str, LayerSpectra] = {}
    for name in measured if names is None else names:
        try:
            out[name] = layers[name].spectra(n)
        except ValueError:
            raise ValueError(f"layer {name!r} has not been measured yet") from None
    return out
