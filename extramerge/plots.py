"""Figures of a trajectory analysis (matplotlib's Agg canvas: no display, no pyplot), drawn in the
repository's one style (``rivervalley.common.plotting``).

The functions draw what they are given (the report dict, PC scores) and compute no analysis themselves.
matplotlib is imported on first use (it costs ~0.4 s, more than a small analysis itself; ``warm_up``
does it ahead of time). Layouts are fixed margins computed from the label sizes rather than
``tight_layout``, which draws every figure an extra time to measure its text, and text is rendered
without hinting: the per-tensor map with 80 labels took 0.95 s that way, 0.35 s now (its glyphs are
most of that).
"""

from __future__ import annotations

import numpy as np

from rivervalley.common import plotting

__all__ = ["spectrum", "trajectory", "per_layer", "warm_up"]

_MAX_ROWS = 80  # tensors shown in the per-layer map (largest variance share first)
_FAST = {"text.hinting": "no_hinting"}  # 25% faster glyphs, same look at 110 dpi


def warm_up() -> None:
    """Import matplotlib's Agg canvas and load the default font now (e.g. while a pass runs elsewhere)."""
    from matplotlib import font_manager
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    from matplotlib.ticker import MaxNLocator  # noqa: F401

    font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))


def _figure(width: float, height: float, *, left=0.12, right=0.97, bottom=0.12, top=0.91):
    """A Figure on an Agg canvas with fixed margins (fractions of the figure) and one Axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=plotting.DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left, right=right, bottom=bottom, top=top)
    return fig, fig.add_subplot()


def _save(fig, path) -> None:
    fig.savefig(path, dpi=plotting.DPI, pil_kwargs={"compress_level": 1})  # zlib level 6 took 40 ms a figure


def spectrum(report: dict, path) -> None:
    """Explained-variance fraction per principal component: raw checkpoints vs SMA-merged (log scale)."""
    from matplotlib.ticker import MaxNLocator

    with plotting.applied(**_FAST):
        fig, ax = _figure(6, 4, left=0.13, bottom=0.12)
        series = [("raw", report["raw"])] + [
            (f"SMA K={k}", g) for k, g in report["merged"].items() if k != "1"
        ]
        for label, g in series:
            fve = np.asarray(g["fve"], dtype=float)
            idx = np.flatnonzero(fve > 0)
            ax.plot(idx + 1, fve[idx], marker="o", label=f"{label} (FVE₁={g['fve1']:.3f})")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("principal component")
        ax.set_ylabel("fraction of variance explained")
        ax.set_title("PCA spectrum of the trajectory")
        ax.legend(fontsize=8, loc="upper right")
        _save(fig, path)


def _plane(scores: np.ndarray) -> np.ndarray:
    """[R, k] scores as [R, 2] points: a missing PC2 is drawn as 0."""
    return scores if scores.shape[1] >= 2 else np.column_stack([scores, np.zeros(len(scores))])


def trajectory(raw: np.ndarray, merged: dict, path) -> None:
    """Raw checkpoints and SMA-merged checkpoints in the raw trajectory's PC1–PC2 plane: ``raw`` holds the
    checkpoints' scores [N, k], ``merged`` {K: scores [N − K + 1, k]} those of each SMA-merged trajectory
    (k ≤ 2, see extramerge.trajectory.project_scores)."""
    n = len(raw)
    raw = _plane(raw)
    with plotting.applied(**_FAST):
        fig, ax = _figure(6, 4.5, left=0.14, bottom=0.11)
        ax.plot(raw[:, 0], raw[:, 1], "-o", color="0.6", ms=4, label="raw checkpoints")
        ax.annotate("newest", raw[-1], textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.margins(x=0.1)  # room for the label
        for K, s in merged.items():
            s = _plane(s)
            ax.plot(s[:, 0], s[:, 1], "-o", ms=3, label=f"SMA K={K}")
        ax.set_xlabel("PC1 (parameter units)")
        ax.set_ylabel("PC2 (parameter units)")
        ax.set_title("Trajectory in the PC1–PC2 plane of the raw checkpoints")
        ax.legend(fontsize=8, loc="best" if n <= 64 else "upper left")
        _save(fig, path)


def per_layer(report: dict, path) -> None:
    """Heatmap of FVE_1 per tensor (rows) and merge window (columns; 'raw' = no merging)."""
    pt = report["per_tensor"]
    cols = ["raw"] + [k for k in pt["fve1"] if k not in ("raw", "1")]
    share = np.asarray(pt["variance_share"], dtype=float)
    order = np.argsort(-share, kind="stable")[:_MAX_ROWS]
    M = np.array([[np.nan if pt["fve1"][c][i] is None else pt["fve1"][c][i] for c in cols] for i in order])
    names = [pt["names"][i] for i in order]
    # Fixed layout: label column sized from the longest name (6 pt DejaVu Sans: ~0.6 em per character).
    label_in = 0.2 + 0.6 * 6 / 72 * max((len(s) for s in names), default=1)
    plot_in, bar_in = 0.8 * len(cols), 1.3
    width = label_in + plot_in + bar_in
    height = 1.0 + 0.18 * max(len(names), 1)
    with plotting.applied(**_FAST, **{"axes.grid": False}):  # no grid lines across the heatmap's cells
        fig, ax = _figure(
            width, height, left=label_in / width, right=(label_in + plot_in) / width, bottom=0.5 / height,
            top=1 - 0.45 / height,
        )  # fmt: skip
        im = ax.imshow(M.reshape(len(names), len(cols)), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(cols)), [c if c == "raw" else f"K={c}" for c in cols])
        ax.set_yticks(range(len(names)), names, fontsize=6)
        title = "FVE₁ per tensor"
        if len(pt["names"]) > _MAX_ROWS:
            title += f" ({_MAX_ROWS} of {len(pt['names'])} with the largest spread)"
        ax.set_title(title, fontsize=9)
        cax = fig.add_axes(
            ((label_in + plot_in + 0.15) / width, 0.5 / height, 0.2 / width, 1 - 0.95 / height)
        )
        fig.colorbar(im, cax=cax, label="FVE₁")
        _save(fig, path)
