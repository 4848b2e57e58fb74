"""Property-test your own merging and extrapolation code against the river-valley theory.

Checks you call on your own code (each raises ``AssertionError`` saying which guarantee failed, on which
input, by how much):

- :func:`check_affine_merge` ``(fn, n, p=None, expected=None) -> weights``: ``fn([n, p]) -> [p]`` is a
  proper affine merge (linear, one weight vector for every coordinate, weights summing to 1), and its
  recovered weight vector equals ``expected`` (e.g. ``rivervalley.weights.extra(n, 4, 2, 0.5)``);
- :func:`check_exact_on_lines` ``(fn, n, at=None) -> position``: checkpoints on a straight line are merged
  onto it, where the weights' lag says (or at ``at``);
- :func:`check_expected_gain` ``(weights_or_fn, params) -> GainCheck``: the mean ΔL of the merge on a
  simulated river valley equals the closed form of THEORY.md §d' (a z-score);
- :func:`check_extrapolation_limits` ``(family, params) -> LimitCheck``: how far past the newest
  checkpoint an extrapolating family w(α) keeps gaining, measured next to theory.

:class:`RiverValley` (linear or curved river, closed forms) and :class:`BendingRiver` (a floor that
bends, SineRiver or HyperbolaRiver, with an estimate) hold the parameters a check simulates. Hypothesis
strategies live in
:mod:`rivervalley.testing.strategies` (needs ``hypothesis``, the ``testing`` extra); the pytest plugin
:mod:`rivervalley.testing.plugin` (registered through the ``pytest11`` entry point) gives a ``rivervalley``
fixture with seeded checks.
"""

from __future__ import annotations

from .affine import check_affine_merge, check_exact_on_lines, default_rtol
from .bending import BendingRiver
from .gain import GainCheck, check_expected_gain
from .limits import LimitCheck, check_extrapolation_limits
from .params import RiverValley

__all__ = [
    "check_affine_merge",
    "check_exact_on_lines",
    "check_expected_gain",
    "check_extrapolation_limits",
    "default_rtol",
    "GainCheck",
    "LimitCheck",
    "RiverValley",
    "BendingRiver",
]
