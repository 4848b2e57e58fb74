"""The classic weight vectors (SMA, EMA, WMA, Extra-Merge, trend, the theory-optimal filter), ``custom``,
``apply`` and ``lag`` (THEORY.md §d'). Re-exported by :mod:`rivervalley.weights`, whose docstring states the
conventions every builder follows.

The last section holds the argument checks of the river-valley model parameters that :func:`optimal`
needs; :mod:`rivervalley.theory` uses the same checks (ValueErrors naming the parameter and its range).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from rivervalley.checks import as_integer, as_scalar, linear_river_setup

__all__ = [
    "sma",
    "ema",
    "wma",
    "extra",
    "extrapolate",
    "trend",
    "optimal",
    "custom",
    "apply",
    "lag",
    "correlation_matrix",
    "merge_matrix",
]

AFFINE_TOL = 1e-9


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _need(n: int, needed: int, what: str) -> None:
    if n < needed:
        raise ValueError(f"{what} needs at least {needed} checkpoints, got n={n}")


def sma(n: int, window: int) -> np.ndarray:
    """Simple moving average of the last K checkpoints: w_j = 1/K for j > N−K, else 0."""
    n, window = _check_int("n", n, 1), _check_int("window", window, 1)
    _need(n, window, f"sma(window={window})")
    w = np.zeros(n)
    w[n - window :] = 1.0 / window
    return w


def ema(n: int, decay: float) -> np.ndarray:
    """Exponential moving average m_k = β m_{k−1} + (1−β) θ_k started at m_1 = θ_1.

    Weights: w_1 = β^{N−1}, w_j = (1−β) β^{N−j} for j ≥ 2 (they sum to 1 exactly).
    """
    n = _check_int("n", n, 1)
    decay = _check_finite("decay", decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    j = np.arange(1, n + 1)
    w = (1.0 - decay) * decay ** (n - j).astype(float)
    w[0] = decay ** (n - 1)
    return w


def wma(n: int, window: int) -> np.ndarray:
    """Linearly weighted average of the last K checkpoints: weights ∝ 1, 2, ..., K (newest heaviest)."""
    n, window = _check_int("n", n, 1), _check_int("window", window, 1)
    _need(n, window, f"wma(window={window})")
    w = np.zeros(n)
    ramp = np.arange(1, window + 1, dtype=float)
    w[n - window :] = ramp / ramp.sum()
    return w



def extra(n: int, window: int, offset: int, alpha: float) -> np.ndarray:
    """Extra-Merge E = M_N + α (M_N − M_{N−d}), M_k the SMA of checkpoints k−K+1..k (THEORY.md §d).

    α = 0 or d = 0 gives M_N; on an exact line, α = (K−1)/(2d) returns θ_N.
    """
    n = _check_int("n", n, 1)
    window, offset = _check_int("window", window, 1), _check_int("offset", offset, 0)
    alpha = _check_finite("alpha", alpha)
    _need(n, window + offset, f"extra(window={window}, offset={offset})")
    out = np.zeros(n)
    out[n - window - offset :] = extrapolate(sma(window, window), offset, alpha)
    return out


def extrapolate(base, offset: int, alpha: float) -> np.ndarray:
    """Extra-Merge of any windowed merge: with M_t = Σ_j b_j θ_{t−K+j} (``base``, length K, oldest first),
    E = M_t + α (M_t − M_{t−d}) as one vector over the last K + d checkpoints, oldest first."""
    b = np.asarray(base, dtype=np.float64).reshape(-1)
    offset, alpha = _check_int("offset", offset, 0), _check_finite("alpha", alpha)
    return (1.0 + alpha) * np.concatenate([np.zeros(offset), b]) - alpha * np.concatenate(
        [b, np.zeros(offset)]
    )


def trend(n: int, window: int, ahead: float = 0.0, steps: Sequence[float] | None = None) -> np.ndarray:
    """Least-squares line through the last K checkpoints, evaluated ``ahead`` past the newest one.

    With positions x_j (checkpoint index, or ``steps`` when given) and target x_0 = x_N + ahead:
    w_j = 1/K + (x_0 − x̄)(x_j − x̄) / Σ(x − x̄)². Exact lines are reproduced exactly.
    ``ahead`` is in checkpoints, or in the units of ``steps`` when those are given.
    """
    n, window = _check_int("n", n, 1), _check_int("window", window, 1)
    ahead = _check_finite("ahead", ahead)
    _need(n, window, f"trend(window={window})")
    x = np.arange(1, n + 1, dtype=float) if steps is None else np.asarray(steps, dtype=float)
    if x.shape != (n,):
        raise ValueError(f"steps must have one entry per checkpoint ({n}), got shape {x.shape}")
    if not np.all(np.isfinite(x)) or np.any(np.diff(x) <= 0):
        raise ValueError("steps must be finite and strictly increasing")
    xs = x[n - window :]
    x0 = x[-1] + ahead
    w = np.zeros(n)
    if window == 1:
        if ahead != 0.0:
            raise ValueError("trend with window=1 cannot extrapolate (ahead != 0): a line needs window >= 2")
        w[-1] = 1.0
        return w
    dx = xs - xs.mean()
    w[n - window :] = 1.0 / window + (x0 - xs.mean()) * dx / np.dot(dx, dx)
    return w


def optimal(n: int, *, slope: float, lr: float, interval: int, curvatures, noise=1.0) -> np.ndarray:
    """Theory-optimal affine merge for the linear river (THEORY.md §d'): argmin ΔL(w) s.t. 1ᵀw = 1.

    ΔL(w) = c²ηs(N − tᵀw) − Σω_i + wᵀQw with Q = Σ_i ω_i Γ_i (:func:`correlation_matrix`); the Lagrange
    condition gives w = Q⁻¹(c²ηs·t + ν1)/2, ν = (2 − c²ηs·1ᵀQ⁻¹t) / (1ᵀQ⁻¹1). Needs Q positive definite
    (noise > 0 and some |ρ_i| < 1); a ValueError says so otherwise.
    Also :func:`rivervalley.theory.optimal_weights`.
    """
    n = int(as_scalar("n", as_integer("n", n, 1)))
    push, rho, omega = linear_river_setup(slope, lr, interval, curvatures, noise)
    Q = np.einsum("i,ijl->jl", omega, correlation_matrix(rho, n))
    rhs = np.stack([np.arange(1, n + 1, dtype=float), np.ones(n)], axis=1)
    from scipy import linalg  # here, not at the top: the weight vectors stay a light numpy-only import

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", linalg.LinAlgWarning)
            solved = linalg.solve(Q, rhs, assume_a="pos")
    except (linalg.LinAlgError, linalg.LinAlgWarning, ValueError) as exc:
        raise ValueError(
            "optimal_weights needs noise > 0 and at least one curvature with (1 - lr*curvature)**interval "
            "clearly inside (-1, 1); otherwise Q = Σ ω_i Γ_i is singular to working precision and the loss "
            "has no finite minimiser"
        ) from exc
    q_t, q_1 = solved[:, 0], solved[:, 1]
    nu = (2.0 - push * q_t.sum()) / q_1.sum()
    return (push * q_t + nu * q_1) / 2.0


def custom(weights: Sequence[float], *, tol: float = 1e-6) -> tuple[np.ndarray, bool]:
    """A user's weight vector, oldest first. Returns (w, affine) where affine says whether Σw = 1 within tol.

    Weights that do not sum to 1 are returned unchanged: the caller decides whether to warn or refuse.
    """
    w = np.asarray(list(weights), dtype=float)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("weights must be a non-empty list of numbers")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    return w, bool(abs(w.sum() - 1.0) <= tol)


def lag(weights) -> float:
    """Checkpoints the merge trails the newest one by along a linear river: N − Σ_j j w_j (THEORY.md §d')."""
    w = np.asarray(weights, dtype=float)
    t = np.arange(1, w.shape[-1] + 1)
    return w.shape[-1] - w @ t


def correlation_matrix(rho, n: int) -> np.ndarray:
    """Γ(ρ)[j, l] = ρ^{|j−l|}: the correlation of n consecutive checkpoints of an AR(1) valley coordinate
    (THEORY.md §b), so that wᵀΓw is the share of one checkpoint's valley variance a merge w keeps.
    ``rho``: a scalar ([n, n] result) or an array of them (result [..., n, n])."""
    idx = np.arange(int(n))
    lags = np.abs(np.subtract.outer(idx, idx)).astype(float)
    return np.asarray(rho, dtype=float)[..., None, None] ** lags


def merge_matrix(n: int, window: int) -> np.ndarray:
    """Rows are the SMA weight vectors of the consecutive merged checkpoints M_K..M_N: shape [N−K+1, N]."""
    n, window = _check_int("n", n, 1), _check_int("window", window, 1)
    _need(n, window, f"merge_matrix(window={window})")
    rows = n - window + 1
    W = np.zeros((rows, n))
    for r in range(rows):
        W[r, r : r + window] = 1.0 / window
    return W


def apply(weights, trajectory):
    """Σ_j w_j θ_j over the checkpoint axis (second to last) of ``trajectory`` [..., N, p].

    Works on numpy arrays and torch tensors alike (the result has the trajectory's type and dtype).
    ``weights`` may also be a matrix [R, N] of weight vectors, giving [..., R, p].
    """
    w = np.asarray(weights, dtype=float)
    n = trajectory.shape[-2]
    if w.shape[-1] != n:
        raise ValueError(f"weights have {w.shape[-1]} entries but the trajectory has {n} checkpoints")
    if isinstance(trajectory, np.ndarray):
        return np.einsum("...n,...np->...p" if w.ndim == 1 else "rn,...np->...rp", w, trajectory)
    import torch

    wt = torch.as_tensor(w, dtype=trajectory.dtype, device=trajectory.device)
    if wt.ndim == 1:
        return torch.einsum("n,...np->...p", wt, trajectory)
    return torch.einsum("rn,...np->...rp", wt, trajectory)
