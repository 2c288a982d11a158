"""Resuming a run whose reference moves: a full fine-tune's pretrained copies, saved beside its checkpoints.

A full fine-tune changes the very weights it is compared against, so a run resumed from a checkpoint cannot take
the pretrained copies from its (already fine-tuned) model again. The first run writes them to
``<output_dir>/spectral_baseline.safetensors`` and records their fingerprint in the Trainer's log history; a resumed
run reads them back, layer by layer, and checks the fingerprint, so it never silently compares the fine-tuned
weights with themselves or with another run's baseline.
"""

from __future__ import annotations

import os

from .basis_store import weight_fingerprint
from .full_finetune import DenseMatrix, Keep
from .monitor import SpectralMonitor

__all__ = ["BASELINE_FILE", "fingerprint", "load", "save", "save_or_restore"]

BASELINE_FILE = "spectral_baseline.safetensors"


def fingerprint(matrices: list[DenseMatrix]) -> str:
    """One hash over every stored pretrained copy, in order."""
    return weight_fingerprint(*(m.pretrained for m in matrices))


def save(matrices: list[DenseMatrix], path: str) -> str:
    """Write the pretrained copies to ``path`` (safetensors, one tensor per layer name); returns their fingerprint."""
    from safetensors.torch import save_file

    digest = fingerprint(matrices)
    save_file({m.name: m.pretrained.contiguous() for m in matrices}, path, metadata={"fingerprint": digest})
    return digest


def load(matrices: list[DenseMatrix], path: str, expected: str | None, keep: Keep | None = None) -> None:
    """Replace the copies taken from the resumed (already fine-tuned) model by the first run's, after checking they
    are the baseline the run's history was measured against (fingerprint ``expected``)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise ValueError(
            f"resuming a full fine-tune needs the pretrained baseline the first run saved at {path!r}, which is "
            "missing: without it the monitor would compare the fine-tuned weights with themselves"
        )
    with safe_open(path, "pt") as stored:  # one layer at a time: with keep= on disk, never the whole baseline in RAM
        names = set(stored.keys())
        for m in matrices:
            if m.name not in names or tuple(stored.get_slice(m.name).get_shape()) != tuple(m.pretrained.shape):
                raise ValueError(f"the pretrained baseline at {path!r} does not match the monitored layer {m.name}")
            copy = stored.get_tensor(m.name).to(m.pretrained.device, m.pretrained.dtype)
            m.pretrained = copy if keep is None else keep(copy)
    if fingerprint(matrices) != expected:
        raise ValueError(
            f"the pretrained baseline at {path!r} is not the one this run's history was measured against "
            "(fingerprint mismatch): it was overwritten by another run"
        )


def save_or_restore(monitor: SpectralMonitor, output_dir: str, resumed: bool, expected: str | None) -> str | None:
    """Save the baseline of a new run, or restore a resumed run's (whose log history recorded the fingerprint
    ``expected``). Returns the fingerprint to record, or None when the monitor keeps no copies (LoRA: the
    frozen base weight is its own baseline)."""
    matrices = [m for m in monitor.matrices if isinstance(m, DenseMatrix)]
    if not matrices:
        return None
    path = os.path.join(output_dir, BASELINE_FILE)
    if resumed:
        load(matrices, path, expected, monitor.keep_copy)
        return expected
    os.makedirs(output_dir, exist_ok=True)
    return save(matrices, path)
