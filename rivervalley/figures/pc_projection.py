"""Raw checkpoints oscillate, merged checkpoints move on a line: PC1–PC2 projections (THEORY.md §e).

One SGD run on the linear-river quadratic with an oscillating valley mode (ηλ = 1.6, ρ = −0.6) and two
slow ones. Left: the last n = 40 raw checkpoints projected on their own first two principal components.
Middle: the n = 40 SMA-merged checkpoints (K = 16) of the same run on theirs. Right: explained-variance
fractions of the first PCs (from the Gram matrix, as for real checkpoints), averaged over seeds.
"""

from __future__ import annotations

import numpy as np

from rivervalley import analysis
from rivervalley import weights as W
from rivervalley.common import plotting
from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.simulate import simulate

NAME = "pc_projection"
SLOPE, LR, CURVATURES = 0.2, 0.5, [3.2, 1.0, 0.5]  # ρ = −0.6, 0.5, 0.75 per step
N_POINTS, WINDOW = 40, 16


def make(out, *, quick: bool = False, seed: int = 0):
    seeds = 50 if quick else 200
    land = QuadraticRiverValley(slope=SLOPE, curvatures=CURVATURES)
    n_raw = N_POINTS + WINDOW - 1
    res = simulate(
        land,
        lr=LR,
        seeds=seeds,
        noise=1.0,
        river_noise=0.0,
        ckpt_every=1,
        n_ckpts=n_raw,
        ckpt_from=100,
        init="zero",
        seed=seed,
    )
    X = res.checkpoints.numpy()
    X = X - X[:, :1]  # translation does not change PCA; it keeps the Gram well conditioned
    G = analysis.gram(X)
    G_raw = G[:, -N_POINTS:, -N_POINTS:]
    G_merged = analysis.merged_gram(G, W.merge_matrix(n_raw, WINDOW))
    ev_raw, ev_merged = analysis.explained_variance(G_raw), analysis.explained_variance(G_merged)
    (s_raw, _), (s_merged, _) = analysis.pc_scores(G_raw[0]), analysis.pc_scores(G_merged[0])
    # pc_scores orients PC1 along the direction of travel, so both panels read left to right

    fig, axes = plotting.figure(3, width=3.6, height=3.3)
    for ax, s, ev, title, color in (
        (axes[0], s_raw, ev_raw[0], "raw checkpoints", plotting.COLORS["raw"]),
        (axes[1], s_merged, ev_merged[0], f"merged, SMA K={WINDOW}", plotting.COLORS["sma"]),
    ):
        ax.plot(s[:, 0], s[:, 1], "-", color=color, lw=0.8, alpha=0.6)
        sc = ax.scatter(s[:, 0], s[:, 1], c=np.arange(len(s)), cmap="viridis", s=14, zorder=3)
        ax.set(
            xlabel=f"PC1 ({ev[0]:.0%} of variance)",
            ylabel=f"PC2 ({ev[1]:.0%})",
            title=f"{title}: FVE₁ = {ev[0]:.2f}",
        )
        ax.set_aspect("equal", adjustable="datalim")
    fig.colorbar(sc, ax=axes[1], label="checkpoint index", shrink=0.8)
    k = np.arange(1, 6)
    m_raw, se_raw = plotting.mean_se(ev_raw[:, :5])
    m_mer, se_mer = plotting.mean_se(ev_merged[:, :5])
    axes[2].bar(k - 0.2, m_raw, 0.4, yerr=se_raw, color=plotting.COLORS["raw"], label="raw")
    axes[2].bar(k + 0.2, m_mer, 0.4, yerr=se_mer, color=plotting.COLORS["sma"], label=f"merged K={WINDOW}")
    axes[2].set(
        xlabel="principal component",
        ylabel="explained variance fraction",
        ylim=(0, 1),
        title=f"mean over {seeds} seeds",
    )
    axes[2].set_xticks(k)
    axes[2].legend()
    data = {
        "scenario": {
            "slope": SLOPE,
            "lr": LR,
            "curvatures": CURVATURES,
            "rho": [1 - LR * c for c in CURVATURES],
            "n": N_POINTS,
            "window": WINDOW,
            "seeds": seeds,
        },
        "example_seed_scores": {"raw": s_raw, "merged": s_merged},
        "explained_variance_mean": {"raw": m_raw, "merged": m_mer},
        "explained_variance_se": {"raw": se_raw, "merged": se_mer},
    }
    return [plotting.save_figure(fig, out, NAME), plotting.save_data(data, out, NAME)]


if __name__ == "__main__":  # python -m rivervalley.figures.NAME --out DIR [--quick] [--seed S]
    import sys

    from rivervalley.figures import script_main

    script_main(sys.modules[__name__])
