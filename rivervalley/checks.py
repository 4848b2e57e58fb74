"""Argument checks of the river-valley model parameters (slope, learning rate, curvatures, decays, ...),
shared by ``rivervalley.weights`` and ``rivervalley.theory``: each returns a clean array or raises one
ValueError naming the argument and the rule it breaks. A leaf: it imports nothing from the library."""

from __future__ import annotations

import numpy as np


def fmt_value(value) -> str:
    return f"{float(value):g}"


def as_real(name: str, value) -> np.ndarray:
    """Float array of ``value``; NaN or ±inf raise a ValueError naming ``name``."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number or array of real numbers, got {value!r}") from exc
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not be NaN")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {fmt_value(arr[~np.isfinite(arr)].flat[0])}")
    return arr


def require(name: str, arr: np.ndarray, ok, rule: str) -> np.ndarray:
    ok = np.broadcast_to(ok, arr.shape)
    if not ok.all():
        raise ValueError(f"{name} must {rule}, got {fmt_value(arr[~ok].flat[0])}")
    return arr


def as_positive(name: str, value) -> np.ndarray:
    arr = as_real(name, value)
    return require(name, arr, arr > 0, "be > 0")


def as_nonnegative(name: str, value) -> np.ndarray:
    arr = as_real(name, value)
    return require(name, arr, arr >= 0, "be >= 0")


def as_integer(name: str, value, minimum: int) -> np.ndarray:
    arr = as_real(name, value)
    return require(name, arr, (arr == np.round(arr)) & (arr >= minimum), f"be an integer >= {minimum}")


def as_rho(value) -> np.ndarray:
    arr = as_real("rho", value)
    return require("rho", arr, np.abs(arr) <= 1, "lie in [-1, 1]")


def as_decay(value) -> np.ndarray:
    arr = as_real("decay", value)
    return require("decay", arr, (arr >= 0) & (arr < 1), "lie in [0, 1)")


def as_curvatures(value) -> np.ndarray:
    arr = np.atleast_1d(as_real("curvatures", value))
    if arr.ndim != 1:
        raise ValueError(f"curvatures must be a scalar or a 1-D array, got shape {arr.shape}")
    return require(
        "curvatures",
        arr,
        arr >= 0,
        "be >= 0 (negative curvature has no stationary valley; model it as the river instead)",
    )


def check_step_product(name: str, product: np.ndarray, allow_zero: bool) -> None:
    """ηλ must keep SGD stable: (0, 2) for a stationary result, [0, 2) where λ = 0 only drops out."""
    low_ok = product >= 0 if allow_zero else product > 0
    interval = "[0, 2)" if allow_zero else "(0, 2)"
    require(name, product, low_ok & (product < 2), f"lie in {interval} for a stationary result")


def as_scalar(name: str, arr: np.ndarray) -> float:
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar here, got shape {arr.shape}")
    return float(arr)


def to_output(arr):
    arr = np.asarray(arr, dtype=float)
    return float(arr) if arr.ndim == 0 else arr


def linear_river_setup(slope, lr, interval, curvatures, noise):
    """Validated scalars c, η, s and per-direction σ_i of the linear river (THEORY.md §d').

    Returns (c²ηs, ρ_i = (1 − ηλ_i)^s, ω_i = ησ_i²/(2(2 − ηλ_i))).
    """
    slope = as_scalar("slope", as_real("slope", slope))
    lr = as_scalar("lr", as_positive("lr", lr))
    interval = as_scalar("interval", as_integer("interval", interval, 1))
    curvatures = as_curvatures(curvatures)
    noise = as_nonnegative("noise", noise)  # one σ for all directions, or one per curvature
    if noise.ndim > 1 or (noise.ndim == 1 and noise.shape != curvatures.shape):
        raise ValueError(
            f"noise must be a scalar or one value per curvature ({curvatures.size}), got shape {noise.shape}"
        )
    check_step_product("lr*curvatures", lr * curvatures, allow_zero=True)
    rho = (1.0 - lr * curvatures) ** interval
    omega = lr * noise**2 / (2.0 * (2.0 - lr * curvatures))
    return slope**2 * lr * interval, rho, omega
