"""Merging is a low-pass filter: SMA/EMA power response over the valley spectrum (THEORY.md §b).

Left: |H(ω)|² of SMA windows and of EMAs with the same river lag (β = (K−1)/(K+1)), on top of the
normalised AR(1) spectra S(ω)/V = (1−ρ²)/(1 − 2ρ cos ω + ρ²) of a slow (ρ = 0.9), a white (ρ = 0) and an
oscillating (ρ = −0.6, ηλ > 1) valley mode. Right: the valley variance gain G(ρ) = (1/2π)∫|H|²S/V dω
(closed forms, lines) with the frequency-domain integral evaluated numerically (points): the two agree.
"""

from __future__ import annotations

import numpy as np

from rivervalley import theory
from rivervalley.common import plotting

NAME = "sma_ema_response"
WINDOWS = (4, 16)
MODES = (0.9, 0.0, -0.6)


def _spectrum(rho, omega):
    return (1 - rho**2) / (1 - 2 * rho * np.cos(omega) + rho**2)


def _integral_gain(response2, rho, omega):
    """(1/2π)∫_{−π}^{π} |H|² S/V dω on a uniform grid over [0, π] (the integrand is even)."""
    f = response2 * _spectrum(rho, omega)
    return float(np.trapezoid(f, omega) / np.pi)


def make(out, *, quick: bool = False, seed: int = 0):
    omega = np.linspace(0.0, np.pi, 4001)
    rhos = np.linspace(-0.95, 0.95, 39)
    data = {
        "omega": omega[::10],
        "windows": list(WINDOWS),
        "modes": list(MODES),
        "response2": {},
        "spectra": {},
        "gain_closed_form": {},
        "gain_integral": {},
        "rho": rhos,
    }
    fig, (ax, bx) = plotting.figure(2, width=4.6)
    for rho, ls in zip(MODES, (":", "--", "-."), strict=True):
        s = _spectrum(rho, omega)
        data["spectra"][f"rho={rho:g}"] = s[::10]
        ax.plot(omega, s, ls, color="0.55", lw=1.2, label=f"valley mode ρ={rho:g}: S(ω)/V")
    for K, shade in zip(WINDOWS, (0.55, 1.0), strict=True):
        beta = (K - 1) / (K + 1)
        h_sma = theory.sma_response(K, omega) ** 2
        h_ema = theory.ema_response(beta, omega) ** 2
        key_s, key_e = f"SMA K={K}", f"EMA β={beta:.3g}"
        data["response2"][key_s], data["response2"][key_e] = h_sma[::10], h_ema[::10]
        ax.plot(omega, h_sma, color=plotting.COLORS["sma"], alpha=shade, lw=1.4, label=f"|H|² {key_s}")
        ax.plot(
            omega, h_ema, color=plotting.COLORS["ema"], alpha=shade, lw=1.4, label=f"|H|² {key_e} (same lag)"
        )
        closed_s = np.array([theory.sma_gain(K, r) for r in rhos])
        closed_e = np.array([theory.ema_gain(beta, r) for r in rhos])
        integ_s = np.array([_integral_gain(h_sma, r, omega) for r in rhos])
        integ_e = np.array([_integral_gain(h_ema, r, omega) for r in rhos])
        data["gain_closed_form"][key_s], data["gain_closed_form"][key_e] = closed_s, closed_e
        data["gain_integral"][key_s], data["gain_integral"][key_e] = integ_s, integ_e
        bx.plot(rhos, closed_s, color=plotting.COLORS["sma"], alpha=shade, lw=1.4, label=f"G {key_s}")
        bx.plot(rhos, closed_e, color=plotting.COLORS["ema"], alpha=shade, lw=1.4, label=f"G {key_e}")
        bx.plot(rhos[::3], integ_s[::3], "o", ms=3.5, mfc="none", color=plotting.COLORS["sma"], alpha=shade)
        bx.plot(rhos[::3], integ_e[::3], "s", ms=3.5, mfc="none", color=plotting.COLORS["ema"], alpha=shade)
    bx.plot([], [], "o", mfc="none", color="0.3", label="(1/2π)∫|H|²S/V dω (numerical)")
    data["max_abs_gap_closed_vs_integral"] = max(
        float(np.max(np.abs(np.asarray(data["gain_closed_form"][k]) - np.asarray(data["gain_integral"][k]))))
        for k in data["gain_closed_form"]
    )
    ax.set(
        yscale="log",
        ylim=(1e-4, 30),
        xlim=(0, np.pi),
        xlabel="frequency ω (radians per checkpoint)",
        ylabel="power",
        title="Filters over the valley spectrum",
    )
    ax.set_xticks([0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi], ["0", "π/4", "π/2", "3π/4", "π"])
    ax.legend(loc="lower left", fontsize=6.5, ncol=1)
    bx.set(
        yscale="log",
        xlabel="checkpoint-level AR(1) coefficient ρ",
        ylabel="valley variance gain G",
        title="Variance left after merging",
    )
    bx.axvline(0, color="0.8", lw=0.8)
    bx.legend(loc="upper left", fontsize=6.5)
    return [plotting.save_figure(fig, out, NAME), plotting.save_data(data, out, NAME)]


if __name__ == "__main__":  # python -m rivervalley.figures.NAME --out DIR [--quick] [--seed S]
    import sys

    from rivervalley.figures import script_main

    script_main(sys.modules[__name__])
