"""Pictures and a text summary of one measurement, for TensorBoard (and anyone else who wants to look).

Pure functions from report data to matplotlib ``Figure`` objects. Figures are built with the object API
(``matplotlib.figure.Figure``) and rendered with the Agg canvas, never through ``pyplot``: no GUI backend is
touched, the user's backend choice is left alone, and nothing accumulates in pyplot's figure registry during a
long run. matplotlib is imported lazily (extra ``viz``) so the core and the scalar logging never need it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .report import LayerReport, LayerSpectra, SpectralReport

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = [
    "require_matplotlib",
    "grid_position",
    "figure_layers",
    "summary_markdown",
    "cosine_heatmap",
    "intruder_grid",
    "spectrum_plot",
    "render_rgb",
]

_DPI = 80
_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.(.+)$")


def require_matplotlib(option: str) -> None:
    """Fail early, naming the option, when pictures are asked for but matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{option} needs matplotlib: pip install 'lora-spectral-callback[viz]'") from None


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def grid_position(name: str) -> tuple[str, str]:
    """(block, matrix type) of a module path: split after its first numeric component.

    ``bert.encoder.layer.3.attention.self.query`` -> (``bert.encoder.layer.3``, ``attention.self.query``);
    a name without a numeric component is its own block with an empty type.
    """
    match = _LAYER_INDEX.match(name)
    return (match.group(1), match.group(2)) if match else (name, "")


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def figure_layers(report: SpectralReport, limit: int | None) -> list[str]:
    """The layers worth a picture: most intruders first, then the lowest min max|cos| (closest to intruding)."""
    ranked = sorted(
        report.layers, key=lambda n: (-report.layers[n].intruders, min(report.layers[n].max_cos, default=1.0))
    )
    return ranked if limit is None or limit < 0 else ranked[:limit]


def summary_markdown(report: SpectralReport, limit: int = 5) -> str:
    """A few lines for TensorBoard's text tab: totals and the top offending layers (markdown table)."""
    eps = ", ".join(f"{n} at ε={e}" for e, n in report.intruders_total_by_epsilon.items())
    offenders = [n for n in report.layers if report.layers[n].intruders]
    lines = [
        ("" if report.step is None else f"**step {report.step}**: ")
        + f"{report.intruders_total} intruder dimension(s) ({eps}) in "
        f"{len(offenders)}/{len(report.layers)} layers; mean effective rank of ΔW {report.effective_rank_mean:.2f}.",
    ]
    if report.errors:
        lines.append(
            f"Skipped {len(report.errors)} layer(s): "
            + "; ".join(f"{n}: {e}" for n, e in list(report.errors.items())[:3])
        )
    if report.pending:
        lines.append(f"{len(report.pending)} layer(s) not measured yet: their pretrained snapshot is still running.")
    top = figure_layers(report, limit)
    if top:
        lines += ["", "| layer | intruders | min max\\|cos\\| | effective rank |", "|---|---:|---:|---:|"]
        for name in top:
            layer = report.layers[name]
            lines.append(
                f"| {name} | {layer.intruders} | {min(layer.max_cos, default=float('nan')):.3f} | {layer.effective_rank:.2f} |"
            )
    return "\n".join(lines)


def cosine_heatmap(name: str, layer: LayerReport, spectra: LayerSpectra, epsilon: float) -> Figure:
    """Paper Fig. 1: |cos| between the merged top-k singular vectors (columns) and the pretrained top-n (rows).

    A pretrained-like direction is a column with one bright cell; an intruder is a column with none. The strip
    below shows each column's max |cos| over *all* pretrained vectors (the quantity the count thresholds), and
    intruder columns are labelled in red, since a column can be dark in the top-n rows yet match a lower one.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    cos = np.asarray(spectra.cosines, dtype=float).T  # (n pretrained, k merged)
    n, k = cos.shape
    fig = _figure(1.2 + 0.32 * k, 1.6 + 0.16 * n)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[n, 1.5])
    image = top.imshow(cos, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest")
    top.set_ylabel("pretrained singular vector")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(f"{name}\n{layer.intruders} intruder(s) at ε={epsilon:g}", fontsize=9)
    bottom.imshow(np.asarray(layer.max_cos, dtype=float)[None, :], vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    bottom.set_yticks([0], ["max (all)"])
    bottom.set_xticks(range(k), [str(i) for i in range(k)])
    bottom.set_xlabel("merged top-k singular vector")
    for tick, value in zip(bottom.get_xticklabels(), layer.max_cos, strict=True):
        if value < epsilon:
            tick.set_color("red")
            tick.set_fontweight("bold")
    fig.colorbar(image, ax=[top, bottom], label="|cos|", shrink=0.8)
    return fig


def intruder_grid(report: SpectralReport) -> Figure:
    """Blocks x matrix types grid of intruder counts for the whole model (blank: not monitored or skipped)."""
    import numpy as np

    positions = {name: grid_position(name) for name in report.layers}
    rows = sorted({r for r, _ in positions.values()}, key=_natural_key)
    cols = sorted({c for _, c in positions.values()}, key=_natural_key)
    counts = np.full((len(rows), len(cols)), np.nan)
    for name, (r, c) in positions.items():
        counts[rows.index(r), cols.index(c)] = report.layers[name].intruders
    prefix = _common_prefix(rows)
    fig = _figure(2.5 + 1.1 * len(cols), 1.5 + 0.3 * len(rows))
    ax = fig.subplots()
    vmax = max(1.0, float(np.nanmax(counts)) if np.isfinite(counts).any() else 1.0)
    image = ax.imshow(counts, cmap="Reds", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    for (i, j), value in np.ndenumerate(counts):
        if np.isfinite(value):
            ax.text(
                j,
                i,
                f"{int(value)}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > vmax / 2 else "black",
            )
    ax.set_xticks(range(len(cols)), [c or "-" for c in cols], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[len(prefix) :] or r for r in rows], fontsize=8)
    ax.set_ylabel(prefix.rstrip(".") or "layer")
    step = "" if report.step is None else f", step {report.step}"
    ax.set_title(f"intruders at ε={report.epsilon:g}{step}: {report.intruders_total} in total", fontsize=9)
    fig.colorbar(image, ax=ax, label="intruders")
    return fig


def _common_prefix(rows: list[str]) -> str:
    """Shared leading text of the block names up to a '.', so rows read ``0, 1, 2`` instead of full paths."""
    if len(rows) < 2:
        return ""
    first, last = min(rows), max(rows)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[: first.rfind(".", 0, i) + 1]


def spectrum_plot(name: str, layer: LayerReport, spectra: LayerSpectra) -> Figure:
    """Top singular values of the merged weight against the pretrained ones (log scale)."""
    fig = _figure(4.5, 3.2)
    ax = fig.subplots()
    pre = spectra.pretrained_singular_values
    from matplotlib.ticker import MaxNLocator

    ax.semilogy(range(len(pre)), pre, "o-", ms=3, label="pretrained W0")
    ax.semilogy(range(len(layer.singular_values)), layer.singular_values, "s-", ms=3, label="merged W0+ΔW")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("singular value index (0 = largest)")
    ax.set_ylabel("singular value")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def render_rgb(fig: Figure) -> np.ndarray:
    """Rasterise a figure with the Agg canvas to an (H, W, 3) uint8 array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
