"""Where measurements go: one small writer interface, a TensorBoard backend, and the tag scheme.

Tags (``<layer>`` is the readable module path, ``<eps>`` formatted with ``%g``):

- ``spectral/intruders_total`` (primary epsilon) and ``spectral/intruders_total/eps_<eps>`` (every epsilon)
- ``spectral/intruders/<layer>``
- ``spectral/effective_rank/<layer>`` and ``spectral/effective_rank_mean``
- ``spectral/singular_values/<layer>`` (histogram of the top-k singular values of the merged weight)
- ``spectral/errors`` (layers skipped in this measurement) and ``spectral/seconds`` (time it took)
"""

from __future__ import annotations

from typing import Protocol

from .report import SpectralReport

__all__ = ["MetricWriter", "TensorBoardWriter", "scalar_metrics", "headline_metrics"]


def headline_metrics(report: SpectralReport) -> dict[str, float]:
    """The few numbers worth putting in the Trainer's own log line."""
    out: dict[str, float] = {
        "spectral/intruders_total": report.intruders_total,
        "spectral/effective_rank_mean": report.effective_rank_mean,
    }
    if report.errors:
        out["spectral/errors"] = len(report.errors)
    return out


def scalar_metrics(report: SpectralReport) -> dict[str, float]:
    """Every scalar of a report under its TensorBoard tag."""
    out = headline_metrics(report)
    out["spectral/errors"] = len(report.errors)
    out["spectral/seconds"] = report.seconds
    for eps, n in report.intruders_total_by_epsilon.items():
        out[f"spectral/intruders_total/eps_{eps}"] = n
    for name, layer in report.layers.items():
        out[f"spectral/intruders/{name}"] = layer.intruders
        out[f"spectral/effective_rank/{name}"] = layer.effective_rank
    return out


class MetricWriter(Protocol):
    """A destination for reports (TensorBoard, a JSON-lines file, a tracker...)."""

    def write(self, report: SpectralReport, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """Writes reports to a TensorBoard run directory, flushing after each so a live ``tensorboard`` shows it."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, report: SpectralReport, step: int) -> None:
        import numpy as np

        self.write_scalars(scalar_metrics(report), step)
        for name, layer in report.layers.items():
            if layer.singular_values:
                self._writer.add_histogram(f"spectral/singular_values/{name}", np.asarray(layer.singular_values), step)
        self._writer.flush()

    def write_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Extra scalars (e.g. the forgetting proxy) under their own tags."""
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
