"""The pretrained bases: what the monitor keeps per layer, and taking them, on the calling thread or in the
background.

The thin left singular basis of each pretrained weight is the one slow, one-time part of monitoring (a full
decomposition per matrix; stored by :class:`~.basis_store.BasisStore`). :meth:`Snapshots.start` takes it so that it
never stalls a large model's first steps: ``snapshot="auto"`` times the first matrix on the calling thread and
sends the rest to a :class:`~.worker.Worker` when they would take longer than ``background_after`` seconds. A layer
not reached yet has no ``basis``: a measurement then reports it as pending (see :mod:`.measure`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .basis_store import BasisStore
from .config import DTYPES, SpectralConfig
from .guard import NonFinite
from .linalg import KrylovSpace
from .matrix import WeightMatrix
from .metrics import all_finite
from .report import LayerSpectra
from .worker import Worker

__all__ = ["LayerState", "Snapshots"]


@dataclass
class LayerState:
    """What the monitor keeps about one matrix between measurements."""

    basis: Tensor | None = None  # thin left singular basis of the pretrained weight (basis_dtype, basis_device)
    pretrained_sv: Tensor | None = None  # its singular values (float64, CPU), from the same SVD: pictures
    shape: torch.Size | None = None  # the pretrained weight's shape: a layer that changed shape is refused
    snapshot_error: tuple[type[Exception], str] | None = None  # why the snapshot failed (retried next snapshot)
    warm_start: KrylovSpace | None = None  # the last measurement's search space: seeds the next one
    last_vectors: Tensor | None = None  # the last top-k left singular vectors: pictures

    def spectra(self, n_pretrained: int) -> LayerSpectra:
        """|cos| of the last measured top vectors with the first ``n_pretrained`` pretrained ones, and the
        pretrained spectrum kept from the snapshot's SVD (no weight is read, nor, when sharded, gathered)."""
        U, basis, sv = self.last_vectors, self.basis, self.pretrained_sv
        if U is None or basis is None or sv is None:
            raise ValueError("not measured yet")
        cos = (basis[:, :n_pretrained].to(U.device, U.dtype).T @ U).abs().T  # (k, n)
        return LayerSpectra(cos.tolist(), sv[:n_pretrained].tolist())


class Snapshots:
    """The per-layer states of the monitored matrices, and the snapshot of their pretrained bases.

    A layer whose snapshot fails (out of memory, NaN/Inf weight) keeps the reason in ``snapshot_error``, which its
    measurements report, and is retried at the next snapshot; ``strict`` re-raises instead (NaN/Inf excepted: that
    is the training's failure, not the monitor's).
    """

    def __init__(self, names: Iterable[str], config: SpectralConfig, store: BasisStore) -> None:
        self.config = config
        self.layers = {name: LayerState() for name in names}
        self.store = store
        self._worker: Worker[None] | None = None

    @property
    def in_background(self) -> bool:
        """A background snapshot was started and has not been collected by :meth:`join`."""
        return self._worker is not None

    @property
    def pending(self) -> bool:
        """A background snapshot is still running."""
        return self._worker is not None and not self._worker.done

    def missing(self, matrices: Iterable[WeightMatrix]) -> list[WeightMatrix]:
        """The matrices without a basis yet."""
        return [m for m in matrices if self.layers[m.name].basis is None]

    def join(self, wait: bool) -> bool:
        """Collect a finished background snapshot (a strict failure in it is raised here); ``wait`` blocks until it
        finishes. False while one is still running."""
        worker = self._worker
        if worker is not None:
            if not wait and not worker.done:
                return False
            self._worker = None
            worker.result()
        return True

    def start(self, todo: list[WeightMatrix], device: torch.device) -> None:
        """Take the snapshot of ``todo`` as ``config.snapshot`` says (see :class:`~.config.SpectralConfig`)."""
        if not todo:
            return
        background = self.config.snapshot == "background"
        if self.config.snapshot == "auto":
            start = time.perf_counter()
            self.take(todo[0])
            todo = todo[1:]
            background = (time.perf_counter() - start) * len(todo) > self.config.background_after
        self.take_all(todo, wait=not background, device=device)

    def take_all(self, todo: list[WeightMatrix], wait: bool, device: torch.device) -> None:
        """Snapshot ``todo`` now (with a progress bar if configured), or on a worker thread (on ``device``'s
        stream) when ``wait`` is False."""
        if not todo:
            return
        if wait:
            self._take_each(todo, self.config.progress)
        else:
            self._worker = Worker("lora-spectral-snapshot", lambda: self._take_each(todo, False), device)

    def _take_each(self, todo: list[WeightMatrix], progress: bool) -> None:
        from tqdm.auto import tqdm

        for matrix in tqdm(todo, desc="spectral snapshot", disable=not progress, leave=False):
            self.take(matrix)

    def take(self, matrix: WeightMatrix) -> None:
        """Snapshot one matrix; a failure is kept in its state (see the class docstring)."""
        state = self.layers[matrix.name]
        try:
            with torch.no_grad():
                W0 = matrix.base_weight().detach().to(DTYPES[self.config.compute_dtype])
                if not all_finite(W0):
                    raise NonFinite("pretrained weight contains NaN or Inf")
                basis, sv = self.store.basis(W0)
                state.shape, state.pretrained_sv, state.snapshot_error = W0.shape, sv, None
                state.basis = basis  # last: a measurement on another thread takes a basis as "snapshot complete"
        except Exception as err:
            if self.config.strict and not isinstance(err, NonFinite):
                raise
            # Kept as text: holding the exception would keep its traceback's (device) tensors alive.
            if isinstance(err, NonFinite):
                state.snapshot_error = (NonFinite, str(err))
            else:
                state.snapshot_error = (RuntimeError, f"pretrained snapshot failed: {type(err).__name__}: {err}")

    def basis_bytes(self) -> int:
        """Memory held for the pretrained bases (0 when memory-mapped from disk: only droppable page cache)."""
        if self.store.on_disk:
            return 0
        return sum(s.basis.numel() * s.basis.element_size() for s in self.layers.values() if s.basis is not None)
