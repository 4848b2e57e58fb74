"""Closed forms of the river-valley theory (THEORY.md §a–§f), in numpy.

Model (THEORY.md, "The toy model"): L(u, v) = g(u) + ½ Σ_i λ_i v_i², SGD with constant learning rate η and
additive Gaussian gradient noise σ, checkpoints every s steps. Per valley coordinate the checkpoint-level
AR(1) coefficient is ρ = (1 − ηλ)^s, the river drift per checkpoint D = η c s and the expected valley loss of
the last iterate ω = λV/2 = ησ² / (2(2 − ηλ)).

Every function validates its input (ValueError naming the parameter and its allowed range), broadcasts
over array arguments where that makes sense, and returns a Python float for scalar input. The identities
are re-derived in :mod:`rivervalley.symbolic` and checked against brute-force sums in the tests.

Every rule for Extra-Merge's α lives in :mod:`rivervalley.theory.alpha`: α_match, α_geometric from a
trajectory's Gram matrix (``estimate_river``), and the loss-optimal α* with its one edge rule.
"""

from rivervalley.theory.alpha import (
    RiverEstimate,
    alpha_geometric,
    alpha_match,
    curved_optimal_alpha,
    estimate_river,
    loss_optimal_alpha,
    optimal_alpha,
)
from rivervalley.theory.decay import average_gain, decay_average_advance, decay_gain
from rivervalley.theory.extrapolation import curved_expected_loss, extrapolation_delta_loss, valley_factor
from rivervalley.theory.filters import (
    ema_gain,
    ema_lag,
    ema_response,
    sma_cross,
    sma_gain,
    sma_lag,
    sma_response,
    stationary_variance,
)
from rivervalley.theory.merges import curved_weights_delta_loss, optimal_weights, weights_delta_loss
from rivervalley.theory.rank1 import rank1_fraction

__all__ = [
    "stationary_variance",
    "sma_gain",
    "sma_cross",
    "ema_gain",
    "sma_response",
    "ema_response",
    "sma_lag",
    "ema_lag",
    "valley_factor",
    "extrapolation_delta_loss",
    "optimal_alpha",
    "loss_optimal_alpha",
    "alpha_match",
    "alpha_geometric",
    "estimate_river",
    "RiverEstimate",
    "weights_delta_loss",
    "optimal_weights",
    "rank1_fraction",
    "curved_expected_loss",
    "curved_optimal_alpha",
    "curved_weights_delta_loss",
    "decay_gain",
    "average_gain",
    "decay_average_advance",
]
