"""Shared plotting helpers for the paper figures (matplotlib with the non-interactive Agg backend).

Every figure script writes a PNG and the data behind it (JSON, or CSV for tables) into one folder;
:func:`save_figure` and :func:`save_data` do both the same way everywhere.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rivervalley.publish import write_file  # noqa: E402
from rivervalley.style import COLORS, STYLE  # noqa: E402

__all__ = ["figure", "save_figure", "save_data", "save_csv", "errorbars", "mean_se", "COLORS"]


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.3, **kw):
    """A figure with ``nrows × ncols`` axes of about ``width × height`` inches each (style applied)."""
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
        plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def save_data(data: dict, out_dir, name: str) -> Path:
    """Write ``name``.json (numpy arrays become lists, NaN/inf become null)."""
    text = json.dumps(_jsonable(data), indent=1, ensure_ascii=False)
    return write_file(_out(out_dir) / f"{name}.json", lambda p: p.write_text(text))


def save_csv(rows: Sequence[dict], out_dir, name: str) -> Path:
    """Write ``name``.csv from a list of dicts sharing the same keys."""

    def write(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(_jsonable(list(rows)))

    return write_file(_out(out_dir) / f"{name}.csv", write)


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
