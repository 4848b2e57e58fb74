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

:func:`state_dict_merge` adapts merge code that works on lists of state dicts to these checks.

:class:`RiverValley` (linear or curved river, closed forms) and :class:`BendingRiver` (a floor that
bends, SineRiver or HyperbolaRiver, with an estimate) hold the parameters a check simulates. Hypothesis
strategies live in
:mod:`rivervalley.testing.strategies` (needs ``hypothesis``, the ``testing`` extra); the pytest plugin
:mod:`rivervalley.testing.plugin` (registered through the ``pytest11`` entry point) gives a ``rivervalley``
fixture with seeded checks.
"""

from __future__ import annotations

import importlib

# Names load on first use (PEP 562), so that importing the pytest plugin, which pytest does at every start
# once the package is installed, costs no torch import.
_WHERE = {
    "check_affine_merge": "affine",
    "check_exact_on_lines": "affine",
    "default_rtol": "affine",
    "check_expected_gain": "gain",
    "GainCheck": "gain",
    "check_extrapolation_limits": "limits",
    "LimitCheck": "limits",
    "RiverValley": "params",
    "BendingRiver": "bending",
    "state_dict_merge": "adapters",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
