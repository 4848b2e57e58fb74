"""§f of THEORY.md: averaging versus learning-rate decay (valley variance gains and river progress)."""

from __future__ import annotations

import math

import numpy as np

from rivervalley.checks import as_integer, as_nonnegative, as_positive, as_real, to_output

__all__ = ["decay_gain", "average_gain", "decay_average_advance"]


def decay_gain(x):
    """Valley variance left by a linear LR decay to zero over T_d steps, x = ληT_d  (THEORY.md §f).

    G_dec(x) = ½ √(π/x) erf(√x) = Σ_n (−x)^n / (n!(2n+1)) ≈ 0.886/√x; G_dec(0) = 1.
    """
    x = as_nonnegative("x", x)
    small = x < 1e-3
    with np.errstate(all="ignore"):
        from scipy import special  # here, not at the top: `extramerge merge` loads rivervalley.theory

        closed = 0.5 * np.sqrt(np.pi / x) * special.erf(np.sqrt(x))
    series = sum((-x) ** j / (math.factorial(j) * (2 * j + 1)) for j in range(6))
    return to_output(np.where(small, series, closed))


def average_gain(x):
    """Valley variance gain of a dense uniform average over T steps, x = ληT  (THEORY.md §f).

    G_avg(x) = 2(x − 1 + e^{−x})/x² = 2 Σ_{m≥0} (−x)^m/(m+2)! ≈ 2/x; G_avg(0) = 1.
    """
    x = as_nonnegative("x", x)
    small = x < 0.1
    with np.errstate(all="ignore"):
        closed = 2.0 * (x + np.expm1(-x)) / x**2
    series = 2.0 * sum((-x) ** m / math.factorial(m + 2) for m in range(12))
    return to_output(np.where(small, series, closed))


def decay_average_advance(lr, slope, steps):
    """River progress of a linear decay over T steps, equal to the lag of a T-step average: ηc(T+1)/2 (§f)."""
    lr, slope = as_positive("lr", lr), as_real("slope", slope)
    return to_output(lr * slope * (as_integer("steps", steps, 1) + 1) / 2.0)
