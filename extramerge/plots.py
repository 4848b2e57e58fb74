"""Figures of a trajectory analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rivervalley import weights as _weights  # noqa: E402

__all__ = ["spectrum", "trajectory", "per_layer"]

_MAX_ROWS = 80  # tensors shown in the per-layer map (largest variance share first)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spectrum(report: dict, path) -> None:
    """Explained-variance fraction per principal component: raw checkpoints vs SMA-merged (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("raw", report["raw"])] + [(f"SMA K={k}", g) for k, g in report["merged"].items() if k != "1"]
    for label, g in series:
        fve = np.asarray(g["fve"], dtype=float)
        idx = np.flatnonzero(fve > 0)
        ax.plot(idx + 1, fve[idx], marker="o", label=f"{label} (FVE₁={g['fve1']:.3f})")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("principal component")
    ax.set_ylabel("fraction of variance explained")
    ax.set_title("PCA spectrum of the trajectory")
    ax.legend(fontsize=8)
    _save(fig, path)


def trajectory(data, windows, path) -> None:
    """Raw checkpoints and SMA-merged checkpoints in the raw trajectory's PC1–PC2 plane."""
    from extramerge.trajectory import project_scores

    n = data.n
    fig, ax = plt.subplots(figsize=(6, 4.5))
    raw = project_scores(data.gram, np.eye(n), k=2)
    if raw.shape[1] < 2:
        raw = np.column_stack([raw, np.zeros(n)])
    ax.plot(raw[:, 0], raw[:, 1], "-o", color="0.6", ms=4, label="raw checkpoints")
    ax.annotate("newest", raw[-1], textcoords="offset points", xytext=(4, 4), fontsize=8)
    for K in windows:
        if K == 1:
            continue
        s = project_scores(data.gram, _weights.merge_matrix(n, K), k=2)
        if s.shape[1] < 2:
            s = np.column_stack([s, np.zeros(len(s))])
        ax.plot(s[:, 0], s[:, 1], "-o", ms=3, label=f"SMA K={K}")
    ax.set_xlabel("PC1 (parameter units)")
    ax.set_ylabel("PC2 (parameter units)")
    ax.set_title("Trajectory in the PC1–PC2 plane of the raw checkpoints")
    ax.legend(fontsize=8)
    _save(fig, path)


def per_layer(report: dict, path) -> None:
    """Heatmap of FVE_1 per tensor (rows) and merge window (columns; 'raw' = no merging)."""
    pt = report["per_tensor"]
    cols = ["raw"] + [k for k in pt["fve1"] if k not in ("raw", "1")]
    share = np.asarray(pt["variance_share"], dtype=float)
    order = np.argsort(-share, kind="stable")[:_MAX_ROWS]
    M = np.array([[np.nan if pt["fve1"][c][i] is None else pt["fve1"][c][i] for c in cols] for i in order])
    names = [pt["names"][i] for i in order]
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * len(cols), 1.5 + 0.18 * max(len(names), 1)))
    im = ax.imshow(M.reshape(len(names), len(cols)), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), [c if c == "raw" else f"K={c}" for c in cols])
    ax.set_yticks(range(len(names)), names, fontsize=6)
    title = "FVE₁ per tensor"
    if len(pt["names"]) > _MAX_ROWS:
        title += f" ({_MAX_ROWS} of {len(pt['names'])} with the largest spread)"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="FVE₁")
    _save(fig, path)
