"""Resuming a run whose reference the model no longer shows: what the first run saves beside its checkpoints.

Two kinds of monitored matrix compare against something training changes, so a run resumed from a checkpoint
cannot take it from its (already trained) model again:

- a full fine-tune's pretrained weight copies (:class:`~.full_finetune.DenseMatrix`);
- the initial adapter factors ``(s B0, A0)`` of a base-rewriting LoRA init (PiSSA, OLoRA, ...; see
  :class:`~.layers.MonitoredMatrix`), without which the reference ``W_res + s B0 A0`` cannot be rebuilt.

The first run writes them to ``<output_dir>/spectral_baseline.safetensors`` (one tensor per
``<layer>/<part>``) and records their fingerprint in the Trainer's log history; a resumed run reads them back,
layer by layer, and checks the fingerprint, so it never silently compares with the wrong reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

from .basis_store import stream_fingerprint, weight_fingerprint
from .distributed import rank_and_world, sent_from
from .full_finetune import DenseMatrix, Keep
from .layers import MonitoredMatrix
from .matrix import WeightMatrix
from .monitor import SpectralMonitor
from .ranks import shape_only

__all__ = ["BASELINE_FILE", "load", "save", "save_or_restore"]

BASELINE_FILE = "spectral_baseline.safetensors"


def _parts(matrix: WeightMatrix) -> dict[str, Tensor]:
    """What of one matrix must survive a resume (empty: its reference is still in the model)."""
    if isinstance(matrix, DenseMatrix):
        return {"pretrained": matrix.pretrained}
    if isinstance(matrix, MonitoredMatrix):
        return matrix.initial_state()
    return {}


def _restore(matrix: WeightMatrix, parts: dict[str, Tensor], keep: Keep | None) -> None:
    if isinstance(matrix, DenseMatrix):
        copy = parts["pretrained"].to(matrix.pretrained.device, matrix.pretrained.dtype)
        matrix.pretrained = copy if keep is None else keep(copy)
    elif isinstance(matrix, MonitoredMatrix):
        matrix.restore_initial(parts)


def _flat(matrices: list[WeightMatrix]) -> dict[str, Tensor]:
    return {f"{m.name}/{part}": t for m in matrices for part, t in _parts(m).items()}


def _collected(monitor: SpectralMonitor) -> dict[str, Tensor]:
    """The baseline on the main process when a full fine-tune's pretrained copies are split across ranks: each
    copy sent by its owner, one at a time (a collective: every rank calls it); an empty dict elsewhere."""
    rank = rank_and_world()[0]
    out = {}
    for matrix, owner in zip(monitor.matrices, monitor.owners, strict=True):
        for part, t in _parts(matrix).items():
            if isinstance(matrix, DenseMatrix) and owner != 0:
                t = sent_from(t if rank == owner else None, owner)
            if rank == 0:
                out[f"{matrix.name}/{part}"] = t
    return out


def save(tensors: dict[str, Tensor], path: str) -> str | None:
    """Write the baseline ``tensors`` to ``path`` (safetensors); returns their fingerprint, or None when there is
    nothing to keep (plain LoRA: the frozen base weight is its own reference) and no file is written."""
    from safetensors.torch import save_file

    if not tensors:
        return None
    digest = weight_fingerprint(*tensors.values())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata={"fingerprint": digest})
    return digest


def load(
    matrices: list[WeightMatrix],
    path: str,
    expected: str,
    keep: Keep | None = None,
    owned: Sequence[bool] | None = None,
) -> None:
    """Put the first run's baseline back into the matrices (one layer at a time: with ``keep`` on disk, never the
    whole baseline in memory; a matrix not ``owned`` by this rank keeps only its shape), after checking it is the
    one the run's history was measured against."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise ValueError(
            f"resuming needs the pretrained baseline the first run saved at {path!r}, which is "
            "missing: without it the monitor would compare the trained weights with themselves"
        )
    with safe_open(path, "pt") as stored:
        names = set(stored.keys())
        for i, m in enumerate(matrices):
            wanted = _parts(m)
            keys = {part: f"{m.name}/{part}" for part in wanted}
            if not set(keys.values()) <= names or any(
                tuple(stored.get_slice(key).get_shape()) != tuple(wanted[part].shape) for part, key in keys.items()
            ):
                raise ValueError(f"the baseline at {path!r} does not match the monitored layer {m.name}")
            mine = owned is None or owned[i]
            _restore(m, {part: stored.get_tensor(key) for part, key in keys.items()}, keep if mine else shape_only)
        digest = stream_fingerprint(stored.get_tensor(key) for key in _flat(matrices))
    if digest != expected:
        raise ValueError(
            f"the baseline at {path!r} is not the one this run's history was measured against "
            "(fingerprint mismatch): it was overwritten by another run"
        )


def save_or_restore(
    monitor: SpectralMonitor, output_dir: str, resumed: bool, expected: str | None, write: bool = True
) -> str | None:
    """A new run saves its baseline (when ``write``: the main process), a resumed run whose history recorded the
    fingerprint ``expected`` restores it. Returns the fingerprint to record (None: nothing to keep). When a full
    fine-tune's copies are split across ranks, every rank calls it (the copies travel to the main process)."""
    path = os.path.join(output_dir, BASELINE_FILE)
    if not resumed:
        tensors = _collected(monitor) if monitor.split and monitor.mode == "full" else _flat(monitor.matrices)
        return save(tensors, path) if write else None
    if expected is None:
        if _flat(monitor.matrices):
            raise ValueError(
                "resuming needs the baseline (pretrained references) of the first run, whose log history recorded "
                "none: was it started with another monitoring configuration?"
            )
        return None
    rank = rank_and_world()[0]
    load(monitor.matrices, path, expected, monitor.keep_copy, [owner == rank for owner in monitor.owners])
    return expected
