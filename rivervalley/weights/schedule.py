"""Decay-curve merges: the weight vector that turns checkpoints saved at a constant learning rate into the
model a learning-rate decay of a chosen shape would have reached.

References: Tian et al. 2025, "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
Pre-training" (arXiv:2507.17634; merge coefficients c_j and gradient multipliers w_i = Σ_{j≥i} c_j), and
NVIDIA Megatron-LM ``tools/checkpoint/weighted_merge.py`` (``_schedule_to_merge_coefficients``: K
checkpoints, s_k = f(k/K), c_k = s_k − s_{k+1}, shapes ``linear`` and ``minus-sqrt``), whose
discretisation :func:`decay` follows, so that its linear shape is the uniform average of the K checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rivervalley.checks import as_integer, as_scalar

__all__ = ["SHAPES", "decay", "emulated_decay"]

SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: 1.0 - x,  # Megatron "linear": the merge is the uniform average (SMA)
    "minus_sqrt": lambda x: 1.0 - np.sqrt(x),  # Megatron "minus-sqrt", the WSD "1-sqrt" cooldown
    "cosine": lambda x: 0.5 * (1.0 + np.cos(np.pi * x)),
}
_SPELLINGS = {"minus-sqrt": "minus_sqrt", "1-sqrt": "minus_sqrt", "cos": "cosine"}


def _shape(shape) -> Callable[[np.ndarray], np.ndarray]:
    if callable(shape):
        return shape
    key = str(shape).strip().lower()
    key = _SPELLINGS.get(key, key)
    if key not in SHAPES:
        raise ValueError(
            f"shape must be one of {', '.join(SHAPES)} (or a function x -> multiplier), got {shape!r}"
        )
    return SHAPES[key]


def decay(n: int, window: int | None = None, shape="linear") -> np.ndarray:
    """Merge the last K = ``window`` (default n) checkpoints so as to emulate a learning-rate decay.

    Checkpoints θ_0..θ_{K−1} of the window (oldest first, equally spaced) were saved at a constant learning
    rate η; write u_k = θ_k − θ_{k−1} for the update between consecutive checkpoints. The decay multiplies
    update k by s_k = f(k/K) (k = 1..K−1), f = ``shape`` on [0, 1) with f(0) = 1; the weights are

        c_k = s_k − s_{k+1}   (k = 0..K−1, with s_0 = 1 and s_K = 0),   so Σ_k c_k = s_0 = 1.

    Identity: θ_k = θ_0 + Σ_{j≤k} u_j, hence Σ_k c_k θ_k = θ_0 Σ_k c_k + Σ_j u_j Σ_{k≥j} c_k
    = θ_0 + Σ_j s_j u_j: the merge is exactly the run whose update j was scaled by s_j. With a
    checkpoint every m steps, s_j scales all m steps between checkpoints j−1 and j (the decay is applied
    at checkpoint granularity, a staircase), and the equality is exact when the gradients do not depend
    on the parameters (a fixed gradient sequence, e.g. a linear loss); otherwise it holds to first order,
    as WSM argues. Shapes: ``linear`` 1 − x (gives c_k = 1/K: the SMA of the window), ``minus_sqrt``
    1 − √x, ``cosine`` (1 + cos πx)/2, or any function f (a non-monotone f gives negative weights).
    Checkpoints before the window get weight 0. ``functools.partial(decay, shape=...)`` is a ``K -> weights``
    callable for a window kept online.
    """
    n = int(as_scalar("n", as_integer("n", n, 1)))
    K = n if window is None else int(as_scalar("window", as_integer("window", window, 1)))
    if K > n:
        raise ValueError(f"decay(window={K}) needs at least {K} checkpoints, got n={n}")
    f = _shape(shape)
    x = np.arange(1, K, dtype=float) / K
    s = np.asarray(f(x), dtype=float)
    if s.shape != x.shape or not np.all(np.isfinite(s)):
        raise ValueError(f"shape must map [0, 1) to finite multipliers, got {s!r} at x = {x!r}")
    s = np.concatenate([[1.0], s, [0.0]])
    w = np.zeros(n)
    w[n - K :] = s[:-1] - s[1:]
    return w


def emulated_decay(weights) -> np.ndarray:
    """The learning-rate multipliers s_1..s_{n−1} a merge emulates on the updates between its consecutive
    checkpoints: s_k = Σ_{j≥k} w_j (the tail sums; the inverse of :func:`decay` over its window).

    For an affine w, s_0 = Σ w = 1; an SMA of all n emulates the linear decay 1 − k/n, an EMA with decay β
    the multipliers 1 − β^{n−k} (flat, then falling to 1 − β on the last update).
    """
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be a non-empty 1-D vector of finite numbers, got shape {w.shape}")
    return np.cumsum(w[::-1])[::-1][1:]
