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
from torch import nn

from .basis_store import BasisStore
from .config import DTYPES, SpectralConfig
from .discovery import find_matrices
from .distributed import all_gather_objects, is_main_process, rank_and_world
from .full_finetune import Keep
from .guard import FaultGuard
from .matrix import WeightMatrix
from .measure import Decomposition, Measurer
from .ranks import combine_reports, gathered, owned_share, shape_only
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
        if module_is_sharded(model) and not is_main_process():
            keep = shape_only  # only the main process measures a sharded model: gather each copy, keep none
        copy_device = "cpu" if store.on_disk else cfg.basis_device
        self.mode, self.matrices = find_matrices(model, cfg, keep, copy_device)
        self.snapshots = Snapshots([m.name for m in self.matrices], cfg, store)
        self.measurer = Measurer(cfg, self.snapshots.layers, FaultGuard(cfg.strict))
        self._owned: list[WeightMatrix] | None = None  # this rank's share when split across ranks (see _share)

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
        """Whether each rank snapshots and measures its own share of the matrices (``split_across_ranks`` in a
        multi-process LoRA run; a full fine-tune's pretrained copies live on the main process)."""
        return self.config.split_across_ranks and self.mode == "lora" and rank_and_world()[1] > 1 and not self.sharded

    @property
    def collective(self) -> bool:
        """Whether ``measure`` must be called on every rank at the same step: sharded weights, or
        ``split_across_ranks`` in a multi-process run."""
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

    def _share(self) -> list[WeightMatrix]:
        """The matrices this process snapshots and measures: all of them, or its balanced share when split across
        ranks (:func:`.ranks.owned_share`, decided once)."""
        if not self.split:
            return self.matrices
        if self._owned is None:
            self._owned = owned_share(self.matrices, *rank_and_world())
        return self._owned

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
        the other ranks None. With sharded weights (``sharded``: FSDP2, ZeRO-3) each matrix in turn is gathered on
        every rank (``capture()``: its full base weight and factors, one matrix in memory at a time) and measured on
        the main process. With ``split_across_ranks`` each rank measures its share and the layer reports are
        gathered (a strict failure on one rank raises on all of them, so none waits forever). Otherwise call it
        wherever you like (the callback calls it on rank 0 only).
        """
        if matrices is None and self.sharded:
            return self._measure_gathered(step)
        self.snapshot(wait=not self.snapshots.in_background)
        if matrices is None and self.split:
            return self._measure_split(step)
        snapshot = self.snapshots.take if self.sharded else None
        return self.measurer.walk(step, self.matrices if matrices is None else matrices, self.model, snapshot)

    def _measure_split(self, step: int | None) -> SpectralReport | None:
        """Each rank measures its share; the layer reports are combined on the main process, in model order."""
        start = time.perf_counter()
        try:
            local: SpectralReport | str = self.measurer.walk(step, self._share(), self.model)
        except Exception as err:  # strict: every rank must still reach the gather, then all raise
            local = f"{type(err).__name__}: {err}"
        return combine_reports(local, step, [m.name for m in self.matrices], self.config.epsilons, start)

    def _measure_gathered(self, step: int | None) -> SpectralReport | None:
        """The collective measurement of a sharded model (see ``measure``). Every rank walks every matrix's gathers
        whatever happens on the main process (a failed layer, or a ``strict`` raise, drains the rest first), so
        the ranks stay in step."""
        items = gathered(self.matrices)
        if not is_main_process():
            for item in items:  # take part in every gather, measure nothing
                del item
            return None
        try:
            return self.measurer.walk(step, items, self.model, self.snapshots.take)
        finally:
            for item in items:  # only left over after a raise
                del item

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
        parts = all_gather_objects(local)
        failures = [f"rank {rank}: {part}" for rank, part in enumerate(parts) if isinstance(part, str)]
        if failures:
            raise RuntimeError("pictures failed on " + "; ".join(failures))
        if not is_main_process():
            return {}
        gathered = {name: s for part in parts if isinstance(part, dict) for name, s in part.items()}
        order = [m.name for m in self.matrices if m.name in gathered] if names is None else list(names)
        missing = [name for name in order if name not in gathered]
        if missing:
            raise ValueError(f"layer {missing[0]!r} has not been measured yet")
        return {name: gathered[name] for name in order}


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
