"""Extra-Merge on a linear river: ΔL(α) = E L(E_k(α)) − E L(θ_last) predicted versus simulated (§d).

E_k(α) = M_k + α(M_k − M_{k−d}) with M_k the SMA of K checkpoints. The line is the closed form
ΔL(α) = R − Pα − B + 2Wα(1+α); points are simulated means ± standard error over seeds (SGD, step path).
α = 0 is plain merging, α* the theory optimum, α_match = (K−1)/(2d) puts the river at the last iterate;
ΔL < 0 means better than the last checkpoint.
"""

from __future__ import annotations

import numpy as np

from rivervalley import theory
from rivervalley.common import plotting
from rivervalley.validate import delta_loss_samples

NAME = "delta_loss_alpha"
SCENARIO = dict(slope=0.3, lr=0.5, interval=2, window=8, offset=4, curvatures=[1.0, 0.2, 3.0])


def make(out, *, quick: bool = False, seed: int = 0):
    grid = np.linspace(-1.5, 3.0, 301)
    curve = theory.extrapolation_delta_loss(grid, **SCENARIO)
    a_star = float(theory.optimal_alpha(**SCENARIO))
    a_match = theory.alpha_match(SCENARIO["window"], SCENARIO["offset"])
    alphas = np.array(sorted({*np.round(np.linspace(-1.5, 3.0, 10), 3), 0.0, a_star, a_match}))
    seeds = 60 if quick else 300
    vals = delta_loss_samples(alphas, seeds=seeds, seed=seed, n_ckpts=400 if quick else 1000, **SCENARIO)
    mean, se = plotting.mean_se(vals)
    predicted = theory.extrapolation_delta_loss(alphas, **SCENARIO)

    fig, ax = plotting.figure(1, width=5.2, height=3.6)
    ax.plot(grid, curve, color=plotting.COLORS["theory"], lw=1.5, label="theory ΔL(α)")
    plotting.errorbars(
        ax, alphas, mean, se, color=plotting.COLORS["extra"], label=f"simulated ({seeds} seeds, ± se)"
    )
    ax.axhline(0, color=plotting.COLORS["raw"], lw=1, ls="--", label="last checkpoint")
    marks = (
        (0.0, "plain SMA (α=0)", -0.75, 0.08),
        (a_star, f"α*={a_star:.2f}", -0.2, -0.1),
        (a_match, f"α_match={a_match:.3g}", 0.35, 0.06),
    )
    for a, text, dx, dy in marks:
        y = float(theory.extrapolation_delta_loss(a, **SCENARIO))
        ax.annotate(text, (a, y), (a + dx, y + dy), fontsize=7.5, arrowprops={"arrowstyle": "-", "lw": 0.6})
    ax.set_ylim(float(curve.min()) - 0.15, None)
    K, d = SCENARIO["window"], SCENARIO["offset"]
    ax.set(
        xlabel="extrapolation coefficient α",
        ylabel="ΔL(α) = E L(E_k(α)) − E L(θ_last)",
        title=f"Extra-Merge, K={K}, d={d}: predicted vs simulated",
    )
    ax.legend(loc="upper center")
    z = (mean - predicted) / se
    data = {
        "scenario": SCENARIO,
        "alpha_star": a_star,
        "alpha_match": a_match,
        "theory": {"alpha": grid, "delta_loss": curve},
        "simulated": {
            "alpha": alphas,
            "mean": mean,
            "se": se,
            "seeds": seeds,
            "predicted": predicted,
            "z": z,
        },
    }
    return [plotting.save_figure(fig, out, NAME), plotting.save_data(data, out, NAME)]


if __name__ == "__main__":  # python -m rivervalley.figures.NAME --out DIR [--quick] [--seed S]
    import sys

    from rivervalley.figures import script_main

    script_main(sys.modules[__name__])
