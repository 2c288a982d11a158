"""Where measurements go: one small writer interface, a TensorBoard backend, and the tag scheme.

Tags (``<layer>`` is the readable module path, ``<eps>`` formatted with ``%g``):

- ``spectral/intruders_total`` (primary epsilon) and ``spectral/intruders_total/eps_<eps>`` (every epsilon)
- ``spectral/intruders/<layer>``
- ``spectral/effective_rank/<layer>`` and ``spectral/effective_rank_mean``
- signals that do not saturate on large models (primary epsilon; definitions in :mod:`.metrics`, aggregates in
  :class:`.report.SpectralReport`): ``spectral/intruder_energy_share`` (model-wide: mean over layers) and
  ``spectral/intruder_energy_share/<layer>``; ``spectral/intruder_sigma_ratio`` (max over layers) and
  ``spectral/intruder_sigma_ratio/<layer>``; ``spectral/first_intruder`` (min over layers) and
  ``spectral/first_intruder/<layer>`` (k + 1: no intruder)
- ``spectral/singular_values/<layer>`` (histogram of the top-k singular values of the merged weight)
- ``spectral/errors`` (layers skipped in this measurement), ``spectral/pending`` (layers whose background snapshot
  is not done yet), ``spectral/uncertain`` (threshold decisions even float64 could not make; expected 0),
  ``spectral/resolved`` (decisions a float64 pass settled) and ``spectral/seconds`` (time it took)
- ``spectral/summary`` (text: totals and the top offending layers)
- pictures, only through ``write_figures``: ``spectral/intruder_grid``, ``spectral/cosine/<layer>`` (|cos| heatmap,
  paper Fig. 1) and ``spectral/spectrum/<layer>`` (merged vs pretrained singular values)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Protocol

from .figures import summary_markdown
from .guard import FAILED, FaultGuard
from .report import LayerSpectra, SpectralReport

__all__ = [
    "GuardedWriter",
    "MetricWriter",
    "TensorBoardWriter",
    "default_log_dir",
    "ensure_writable_dir",
    "headline_metrics",
    "scalar_metrics",
]

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


def headline_metrics(report: SpectralReport) -> dict[str, float]:
    """The few numbers worth putting in the Trainer's own log line."""
    out: dict[str, float] = {
        "spectral/intruders_total": report.intruders_total,
        "spectral/effective_rank_mean": report.effective_rank_mean,
        "spectral/intruder_energy_share": report.intruder_energy_share,
        "spectral/intruder_sigma_ratio": report.intruder_sigma_ratio,
    }
    if report.errors:
        out["spectral/errors"] = len(report.errors)
    if report.pending:
        out["spectral/pending"] = len(report.pending)
    if report.uncertain:
        out["spectral/uncertain"] = report.uncertain
    return out


def scalar_metrics(report: SpectralReport) -> dict[str, float]:
    """Every scalar of a report under its TensorBoard tag."""
    out = headline_metrics(report)
    out["spectral/errors"] = len(report.errors)
    out["spectral/pending"] = len(report.pending)
    out["spectral/uncertain"] = report.uncertain
    out["spectral/resolved"] = report.resolved
    out["spectral/seconds"] = report.seconds
    if report.first_intruder is not None:
        out["spectral/first_intruder"] = report.first_intruder
    for eps, n in report.intruders_total_by_epsilon.items():
        out[f"spectral/intruders_total/eps_{eps}"] = n
    for name, layer in report.layers.items():
        out[f"spectral/intruders/{name}"] = layer.intruders
        out[f"spectral/effective_rank/{name}"] = layer.effective_rank
        out[f"spectral/intruder_energy_share/{name}"] = layer.intruder_energy_share
        out[f"spectral/intruder_sigma_ratio/{name}"] = layer.intruder_sigma_ratio
        out[f"spectral/first_intruder/{name}"] = layer.first_intruder
    return out


class MetricWriter(Protocol):
    """A destination for reports (TensorBoard, a JSON-lines file, a tracker...)."""

    def write(self, report: SpectralReport, step: int) -> None: ...

    def write_scalars(self, scalars: dict[str, float], step: int) -> None: ...

    def write_figures(self, report: SpectralReport, spectra: dict[str, LayerSpectra], step: int) -> None: ...

    def close(self) -> None: ...


class GuardedWriter:
    """A :class:`MetricWriter` whose failures never reach the training run.

    Every call goes through a :class:`~.guard.FaultGuard` (logged once, recorded in the report's ``errors``, so
    ``spectral/errors`` in the log history counts a write that could not reach the writer itself). A writer that
    fails ``max_failures`` reports in a row (a disk that stays full) is closed and dropped for the rest of the run.
    ``label`` names the backend in messages ("TensorBoard write failed ...").
    """

    def __init__(self, writer: MetricWriter, guard: FaultGuard, label: str = "TensorBoard", max_failures: int = 3):
        self._writer: MetricWriter | None = writer
        self._guard = guard
        self.label = label
        self.max_failures = max_failures
        self._failures = 0

    def write(self, report: SpectralReport, step: int) -> None:
        writer = self._writer
        if writer is None:
            return
        if self._guard(f"{self.label} write", lambda: writer.write(report, step), report) is not FAILED:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self.max_failures:
            logger.warning(
                "lora-spectral-callback: %s writing disabled after %d consecutive failures; measurements "
                "continue in the Trainer's log history",
                self.label,
                self._failures,
            )
            self.close()

    def write_scalars(self, scalars: dict[str, float], step: int) -> None:
        writer = self._writer
        if writer is not None and scalars:
            self._guard(f"{self.label} write", lambda: writer.write_scalars(scalars, step))

    def write_figures(self, report: SpectralReport, spectra: dict[str, LayerSpectra], step: int) -> None:
        writer = self._writer
        if writer is not None:
            self._guard(f"{self.label} pictures", lambda: writer.write_figures(report, spectra, step))

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._guard(f"{self.label} close", writer.close)


class TensorBoardWriter:
    """Writes reports to a TensorBoard run directory, flushing after each so a live ``tensorboard`` shows it.

    ``purge_step`` (for a resumed run) makes TensorBoard discard events a previous run wrote at that step or
    later, so the series never has duplicate or backwards steps (``SummaryWriter(purge_step=...)``).
    After a failed write (full disk, read-only file system) the event file is reopened at the next write: the
    background writer thread of a ``SummaryWriter`` dies on its first I/O error and would fail forever.

    Args:
        log_dir: The run directory.
        purge_step: First step whose older events TensorBoard discards (``None``: a new series).
    """

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir = log_dir
        self._purge_step = purge_step
        self._writer = self._open()
        self._broken = False

    def _open(self) -> SummaryWriter:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.log_dir, purge_step=self._purge_step)

    def write(self, report: SpectralReport, step: int) -> None:
        import numpy as np

        if self._broken:
            self.close()
            self._writer, self._broken = self._open(), False
        try:
            for tag, value in scalar_metrics(report).items():
                self._writer.add_scalar(tag, value, step)
            for name, layer in report.layers.items():
                if layer.singular_values:
                    self._writer.add_histogram(
                        f"spectral/singular_values/{name}", np.asarray(layer.singular_values), step
                    )
            self._writer.add_text("spectral/summary", summary_markdown(report), step)
            self._writer.flush()
        except Exception:
            self._broken = True
            raise
        self._purge_step = None  # written: a reopened file must not purge this run's own events

    def write_figures(self, report: SpectralReport, spectra: dict[str, LayerSpectra], step: int) -> None:
        """The pictures (needs matplotlib): the model-wide intruder grid, and a |cos| heatmap and a spectrum for
        each layer in ``spectra``."""
        from .figures import cosine_heatmap, intruder_grid, render_rgb, spectrum_plot

        images = {"spectral/intruder_grid": intruder_grid(report)}
        for name, data in spectra.items():
            layer = report.layers[name]
            images[f"spectral/cosine/{name}"] = cosine_heatmap(name, layer, data, report.epsilon)
            images[f"spectral/spectrum/{name}"] = spectrum_plot(name, layer, data)
        for tag, fig in images.items():
            self._writer.add_image(tag, render_rgb(fig), step, dataformats="HWC")
        self._writer.flush()

    def write_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Extra scalars (e.g. the forgetting proxy) under their own tags."""
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Close the event file; errors of an already broken writer (the disk is still full) are ignored."""
        try:
            self._writer.close()
        except Exception:
            if not self._broken:
                raise


def default_log_dir(output_dir: str) -> str:
    """A run directory of our own beside the Trainer's TensorBoard logs, never sharing its event file.

    transformers 5.x has no ``TrainingArguments.logging_dir``: its TensorBoardCallback writes to
    ``$TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/runs/<time>_<host>``. We use ``<that root>/spectral``, a
    fixed name so a resumed run continues the same series.
    """
    root = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "runs")
    return os.path.join(os.path.expanduser(root), "spectral")


def ensure_writable_dir(path: str) -> None:
    """Create ``path`` if needed; a ``ValueError`` naming ``log_dir`` when it cannot be created or written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"log_dir={path!r} cannot be created: {err}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"log_dir={path!r} is not writable")
