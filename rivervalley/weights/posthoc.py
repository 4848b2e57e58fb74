"""Post-hoc EMA: the weights over stored snapshots whose combination best matches a power-function EMA
chosen after training (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models" (EDM2), §3 and Algorithms 2-3; lucidrains/ema-pytorch ``post_hoc_ema.py``: ``sigma_rel_to_gamma``,
``p_dot_p``, ``solve_weights``, whose formulas these match).

A power-function EMA with exponent γ, read at step T, averages the parameters of steps t ≤ T with the
profile p_{T,γ}(t) = (γ+1) t^γ / T^{γ+1} on [0, T] (unit mass; in training it is the EMA with
β_t = (1 − 1/t)^{γ+1}). Its width relative to T is σ_rel = √((γ+1) / ((γ+2)² (γ+3))). A combination
Σ_i w_i x_i of snapshots x_i with profiles p_i has the profile Σ_i w_i p_i, so the snapshots' weights for a
target profile p_r are the L2 least-squares fit: A w = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rivervalley.checks import as_nonnegative, as_positive

__all__ = ["PosthocFit", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "profile_dot", "posthoc_ema"]

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # γ = 0: the uniform average of all steps so far


class PosthocFit(NamedTuple):
    """The fitted weights (one per snapshot, in the order given) and how good the fit is.

    ``residual``: ‖Σ w_i p_i − p_r‖ / ‖p_r‖ in L2 over time (0: exact; 1: no better than nothing; above
    ~0.1 the merge is a poor stand-in for the target EMA). ``gamma``/``sigma_rel``/``step``: the target.
    """

    weights: np.ndarray
    residual: float
    gamma: float
    sigma_rel: float
    step: float


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = √((γ+1) / ((γ+2)² (γ+3))): the std of the profile t^γ on [0, 1] (EDM2 eq. 3)."""
    g = float(as_nonnegative("gamma", gamma))
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ with the relative width σ_rel: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)
    (EDM2 Algorithm 2; ema-pytorch ``sigma_rel_to_gamma``). Needs 0 < σ_rel ≤ 1/√12 (γ ≥ 0)."""
    s = float(as_positive("sigma_rel", sigma_rel))
    if s > SIGMA_REL_MAX * (1 + 1e-12):
        raise ValueError(f"sigma_rel must lie in (0, 1/sqrt(12) = {SIGMA_REL_MAX:.6f}] (gamma >= 0), got {s}")
    t = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return max(0.0, float(roots[np.abs(roots.imag) < 1e-9].real.max()))


def profile_dot(t_a, gamma_a, t_b, gamma_b):
    """⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ = ∫ p_a p_b dt = (γ_a+1)(γ_b+1) (t_a/t_b)^e / ((γ_a+γ_b+1) max(t_a, t_b)),
    e = γ_b if t_a < t_b else −γ_a (EDM2 Algorithm 3 ``p_dot_p``). Broadcasts over numpy arrays."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=float) for x in (t_a, gamma_a, t_b, gamma_b))
    e = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def _target(gamma, sigma_rel) -> tuple[float, float]:
    if (gamma is None) == (sigma_rel is None):
        raise ValueError("give exactly one of gamma and sigma_rel for the target EMA")
    if gamma is None:
        gamma = sigma_rel_to_gamma(sigma_rel)
    gamma = float(as_nonnegative("gamma", gamma))
    return gamma, gamma_to_sigma_rel(gamma)


def _steps(steps) -> np.ndarray:
    t = np.atleast_1d(as_positive("steps", steps))
    if t.ndim != 1:
        raise ValueError(f"steps must be a 1-D list of training steps, got shape {t.shape}")
    return t


def _cells(t: np.ndarray) -> np.ndarray:
    """Edges e_0 < e_1 < ... < e_N of the raw checkpoints' cells: midpoints between neighbours, the first
    cell as wide on the left as on the right (not before step 0), the last ending at the newest step."""
    mids = (t[:-1] + t[1:]) / 2.0
    first = max(0.0, t[0] - (mids[0] - t[0])) if t.size > 1 else 0.0
    return np.concatenate([[first], mids, [t[-1]]])


def _solve(A: np.ndarray, b: np.ndarray, affine: bool) -> np.ndarray:
    n = b.size
    if not affine:
        return np.linalg.lstsq(A, b, rcond=None)[0]
    kkt = np.zeros((n + 1, n + 1))  # min wᵀAw − 2bᵀw subject to Σw = 1 (Lagrange)
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = A, 1.0, 1.0
    return np.linalg.lstsq(kkt, np.concatenate([b, [1.0]]), rcond=None)[0][:n]


def posthoc_ema(
    steps: Sequence[float],
    gammas: Sequence[float] | None = None,
    *,
    gamma: float | None = None,
    sigma_rel: float | None = None,
    step: float | None = None,
    affine: bool = True,
) -> PosthocFit:
    """Weights over stored snapshots that reproduce a power-function EMA (target ``gamma`` or
    ``sigma_rel``) read at ``step`` (default: the newest snapshot), with the fit's relative residual.

    EMA snapshots (``gammas`` given: snapshot i is a power EMA with exponent γ_i read at step t_i): the
    EDM2 least-squares fit over their profiles, A w = b. ``affine=False`` is exactly EDM2 Algorithm 3 /
    ema-pytorch ``solve_weights`` (the weights then sum to 1 only as far as the fit is good); the default
    ``affine=True`` adds the constraint Σw = 1 (Lagrange), so the merge is translation-equivariant like
    every vector of this package. The weights may be negative either way.

    Raw checkpoints (``gammas=None``: no EMA, each is one point of the trajectory): a point has no L2
    profile, so each checkpoint stands for its cell of time (midpoints between neighbouring checkpoints;
    the first cell as wide to the left as to the right, the last ending at the newest step, which must be
    the target step) with a flat profile there, and the target is fitted over these cells the same way
    (``affine=False``: w_i = the target's mass in cell i; the constraint spreads the mass before the
    oldest cell over the cells in proportion to their widths). The residual then says how well the
    checkpoint spacing resolves the target: it is large when σ_rel·T is not many cells wide, or when much
    of the target's mass lies before the oldest checkpoint.
    """
    g_r, s_r = _target(gamma, sigma_rel)
    t = _steps(steps)
    T = float(t.max()) if step is None else float(as_positive("step", step))
    if gammas is None:
        if np.any(np.diff(t) <= 0):
            raise ValueError("steps of raw checkpoints must be strictly increasing (oldest first)")
        if T != t[-1]:
            raise ValueError(f"raw checkpoints fit the EMA at the newest step {t[-1]:g} only, got step={T:g}")
        e = _cells(t) / T
        width = np.diff(e)
        mass = np.diff(e ** (g_r + 1.0))
        A, b = np.diag(1.0 / width), mass / width  # unit-mass flat profiles, time in units of T
    else:
        g = np.atleast_1d(as_nonnegative("gammas", gammas))
        if g.shape != t.shape:
            raise ValueError(f"gammas must have one entry per snapshot ({t.size}), got shape {g.shape}")
        if T > t.max():
            raise ValueError(f"step must not lie past the newest snapshot ({t.max():g}), got {T:g}")
        u = t / T  # time in units of T keeps A of order 1
        A = profile_dot(u[:, None], g[:, None], u[None, :], g[None, :])
        b = profile_dot(u, g, 1.0, g_r)
    w = _solve(A, b, affine)
    target = profile_dot(1.0, g_r, 1.0, g_r)
    error = float(w @ A @ w - 2.0 * w @ b + target)
    return PosthocFit(w, math.sqrt(max(error, 0.0) / target), g_r, s_r, T)
