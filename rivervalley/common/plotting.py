"""The one plotting style of both packages, and the helpers the paper figures draw with.

The style (colours, sizes, resolution) is pure data plus :func:`applied`, so importing this module costs
nothing; matplotlib (with the non-interactive Agg backend) is imported on first use. The paper figures
(pyplot, :func:`figure`) and extramerge's figures (Agg canvas, no pyplot) both draw under this style, so a
figure looks the same whichever package made it. Every paper figure writes a PNG and the data behind it
(JSON) into one folder: :func:`save_figure` and :func:`save_data` do both the same way everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .formatting import jsonable
from .publish import write_file

__all__ = [
    "COLORS", "DPI", "SAVE_DPI", "STYLE", "applied", "figure", "save_figure", "save_data", "errorbars",
    "mean_se",
]  # fmt: skip

DPI = 110  # on-screen figure resolution
SAVE_DPI = 130  # PNG resolution of the paper figures

COLORS = {
    "raw": "#d62728",
    "sma": "#1f77b4",
    "ema": "#2ca02c",
    "theory": "#222222",
    "extra": "#9467bd",
    "decay": "#ff7f0e",
    "average": "#1f77b4",
    "bound": "#7f7f7f",
}

STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": SAVE_DPI,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def applied(**overrides):
    """A context manager under which matplotlib draws in this style (``overrides`` take precedence)."""
    import matplotlib

    return matplotlib.rc_context({**STYLE, **overrides})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.3, **kw):
    """A figure with ``nrows × ncols`` axes of about ``width × height`` inches each (style applied)."""
    plt = _pyplot()
    plt.rcParams.update(STYLE)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, axes.ravel() if axes.size > 1 else axes[0, 0]


def _out(out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig, out_dir, name: str) -> Path:
    """Write ``name``.png into ``out_dir`` (created if needed) and close the figure."""
    path = _out(out_dir) / f"{name}.png"
    fig.tight_layout()
    try:
        write_file(path, fig.savefig)  # atomically: never a half-written PNG
    finally:
        _pyplot().close(fig)
    return path


def save_data(data: dict, out_dir, name: str) -> Path:
    """Write ``name``.json (numpy arrays become lists, NaN/inf become null)."""
    text = json.dumps(jsonable(data, finite=True), indent=1, ensure_ascii=False)
    return write_file(_out(out_dir) / f"{name}.json", lambda p: p.write_text(text))


def mean_se(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over independent seeds (``axis``)."""
    v = np.asarray(values, dtype=float)
    n = v.shape[axis]
    return v.mean(axis), v.std(axis, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(v.mean(axis))


def errorbars(ax, x, mean, se, *, label=None, color=None, marker="o", **kw):
    """Simulated points with ±1 standard-error bars (drawn above the theory curves)."""
    return ax.errorbar(
        x, mean, yerr=se, fmt=marker, ms=4, capsize=2.5, lw=1, color=color, label=label, zorder=3, **kw
    )
