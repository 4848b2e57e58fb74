"""Every merge is an affine weight vector over checkpoints (THEORY.md §d').

A trajectory of N checkpoints θ_1..θ_N (oldest first, newest last) is merged as Σ_j w_j θ_j with
Σ_j w_j = 1. SMA (LAWA/PMA), EMA, WMA, Extra-Merge, least-squares trend extrapolation, the theory-optimal
filter, the decay-curve merges of WSM/Megatron and post-hoc EMA profiles are all such vectors, so one
function (``apply``) merges simulated trajectories and one streaming engine (``extramerge``) merges real
checkpoints with the very same numbers.

Every builder returns a float64 numpy array of length ``n`` whose last entry weighs the newest checkpoint;
bad arguments raise a ValueError naming the parameter.

    core      sma, ema, wma, extra, extrapolate (Extra-Merge of any window), trend, optimal, custom,
              apply, lag, correlation_matrix, merge_matrix
    schedule  decay (a learning-rate decay shape over the last K checkpoints, WSM / Megatron
              weighted_merge) and emulated_decay (the decay any weight vector emulates)
    posthoc   posthoc_ema (Karras et al. 2024 power-function EMA profiles fitted by least squares to
              stored EMA snapshots or raw checkpoints), sigma_rel_to_gamma, gamma_to_sigma_rel,
              profile_dot

The subpackage is the leaf of the library: it imports nothing from it but ``rivervalley.checks`` (a leaf).
"""

from __future__ import annotations

from . import core, posthoc, schedule
from .core import *  # noqa: F403
from .core import AFFINE_TOL  # noqa: F401  (the tolerance of "sums to 1", not a builder)
from .posthoc import *  # noqa: F403
from .schedule import *  # noqa: F403

__all__ = [*core.__all__, *schedule.__all__, *posthoc.__all__, "AFFINE_TOL"]  # their lists, once
