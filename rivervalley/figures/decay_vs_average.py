"""Averaging versus learning-rate decay: valley variance left by each, as a function of x = ληT (§f).

Lines: the continuous-time gains G_dec(x) = ½√(π/x)·erf(√x) of a linear decay to zero over T steps and
G_avg(x) = 2(x − 1 + e^{−x})/x² of a dense uniform average of T iterates at constant η, with their
asymptotes 0.886/√x and 2/x. Points: simulated (SGD from stationarity, ηλ = 0.01, mean ± standard error
over seeds). Both advance the river by the same amount, so averaging wins for large x.
"""

from __future__ import annotations

import numpy as np

from rivervalley import theory
from rivervalley.common import plotting
from rivervalley.validate import decay_average_samples

NAME = "decay_vs_average"
LR, CURVATURE = 0.1, 0.1  # ηλ = 0.01: discretisation bias ~0.3%, invisible on this scale


def make(out, *, quick: bool = False, seed: int = 0):
    x = np.logspace(-1.5, 2, 200)
    g_dec, g_avg = theory.decay_gain(x), theory.average_gain(x)
    xs = (0.25, 1.0, 4.0, 16.0) if quick else (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    seeds, m = (30, 20) if quick else (100, 20)
    sims = [
        decay_average_samples(xv, lr=LR, curvature=CURVATURE, m=m, seeds=seeds, seed=seed * 100 + i)
        for i, xv in enumerate(xs)
    ]
    dec = np.array([plotting.mean_se(s["decay"]) for s in sims])
    avg = np.array([plotting.mean_se(s["average"]) for s in sims])

    fig, ax = plotting.figure(1, width=5.2, height=3.6)
    ax.plot(x, g_dec, color=plotting.COLORS["decay"], lw=1.6, label="LR decay to 0: G_dec(x)")
    ax.plot(x, g_avg, color=plotting.COLORS["average"], lw=1.6, label="uniform average: G_avg(x)")
    ax.plot(
        x[x > 1], 0.5 * np.sqrt(np.pi / x[x > 1]), ":", color=plotting.COLORS["decay"], lw=1, label="0.886/√x"
    )
    ax.plot(x[x > 2], 2 / x[x > 2], ":", color=plotting.COLORS["average"], lw=1, label="2/x")
    plotting.errorbars(
        ax, xs, dec[:, 0], dec[:, 1], color=plotting.COLORS["decay"], marker="s", label="simulated decay"
    )
    plotting.errorbars(
        ax, xs, avg[:, 0], avg[:, 1], color=plotting.COLORS["average"], label="simulated average"
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="x = λ·η·T",
        ylabel="valley variance / stationary V",
        title="Decay versus averaging (same river progress)",
    )
    ax.legend(loc="lower left", fontsize=7)
    data = {
        "lr": LR,
        "curvature": CURVATURE,
        "seeds": seeds,
        "coordinates_per_seed": m,
        "theory": {"x": x, "decay_gain": g_dec, "average_gain": g_avg},
        "simulated": {
            "x": list(xs),
            "steps": [s["steps"] for s in sims],
            "decay_mean": dec[:, 0],
            "decay_se": dec[:, 1],
            "average_mean": avg[:, 0],
            "average_se": avg[:, 1],
            "decay_z_vs_continuous": (dec[:, 0] - theory.decay_gain(np.array(xs))) / dec[:, 1],
            "average_z_vs_continuous": (avg[:, 0] - theory.average_gain(np.array(xs))) / avg[:, 1],
        },
    }
    return [plotting.save_figure(fig, out, NAME), plotting.save_data(data, out, NAME)]


if __name__ == "__main__":  # python -m rivervalley.figures.NAME --out DIR [--quick] [--seed S]
    import sys

    from rivervalley.figures import script_main

    script_main(sys.modules[__name__])
