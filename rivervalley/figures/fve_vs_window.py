"""Merged checkpoints fall on a line: FVE_1 of n consecutive merged checkpoints versus the window K (§e).

Theory (lines): the approximation (S + ΣN∥)/(S + ΣN) and the rigorous lower bound S/(S + ΣN) of
THEORY.md §e. Simulation (points ± standard error over seeds): SGD on the linear-river quadratic, FVE_1 of
n = 10 consecutive SMA-merged checkpoints per block, raw checkpoints at K = 1. The approximation runs low
at small K, as THEORY.md warns; both it and the simulation go to 1 as K grows, the bound is loose.
"""

from __future__ import annotations

import numpy as np

from rivervalley import theory
from rivervalley.common import plotting
from rivervalley.validate import fve_samples

NAME = "fve_vs_window"
SCENARIO = dict(slope=0.2, lr=0.5, interval=1, curvatures=[1.0, 0.5, 2.0, 0.2], n=10)


def make(out, *, quick: bool = False, seed: int = 0):
    ks = np.arange(1, 33)
    theory_vals = np.array([theory.rank1_fraction(window=int(K), **SCENARIO) for K in ks])
    sim_ks = (1, 2, 4, 8, 16, 32) if quick else (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    seeds = 40 if quick else 200
    got = fve_samples(windows=sim_ks, seeds=seeds, seed=seed, n_ckpts=400 if quick else 800, **SCENARIO)
    mean = np.array([got[K]["fve"].mean() for K in sim_ks])
    se = np.array([plotting.mean_se(got[K]["fve"])[1] for K in sim_ks])

    fig, ax = plotting.figure(1, width=5.2, height=3.6)
    ax.plot(ks, theory_vals[:, 0], color=plotting.COLORS["theory"], lw=1.5, label="theory ≈ (S+ΣN∥)/(S+ΣN)")
    ax.plot(
        ks, theory_vals[:, 1], "--", color=plotting.COLORS["bound"], lw=1.3, label="rigorous bound S/(S+ΣN)"
    )
    plotting.errorbars(
        ax, sim_ks[1:], mean[1:], se[1:], color=plotting.COLORS["sma"], label="simulated, merged (SMA)"
    )
    plotting.errorbars(
        ax,
        sim_ks[:1],
        mean[:1],
        se[:1],
        color=plotting.COLORS["raw"],
        marker="s",
        label="simulated, raw checkpoints",
    )
    ax.set(
        xscale="log",
        xlabel="merge window K (checkpoints)",
        ylabel="E FVE₁ of n = 10 merged checkpoints",
        ylim=(0, 1.02),
        title="Merging straightens the trajectory",
    )
    ax.set_xticks([1, 2, 4, 8, 16, 32], ["1 (raw)", "2", "4", "8", "16", "32"])
    ax.legend(loc="lower right")
    data = {
        "scenario": SCENARIO,
        "theory": {"K": ks, "approx": theory_vals[:, 0], "lower_bound": theory_vals[:, 1]},
        "simulated": {"K": list(sim_ks), "mean": mean, "se": se, "seeds": seeds},
        "approx_bias_at_simulated_K": mean - theory_vals[np.array(sim_ks) - 1, 0],
    }
    return [plotting.save_figure(fig, out, NAME), plotting.save_data(data, out, NAME)]


if __name__ == "__main__":  # python -m rivervalley.figures.NAME --out DIR [--quick] [--seed S]
    import sys

    from rivervalley.figures import script_main

    script_main(sys.modules[__name__])
