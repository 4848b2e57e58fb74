"""pytest plugin (entry point ``pytest11``: ``rivervalley``): a ``rivervalley`` fixture with seeded checks.

Installed with the package, so any test suite can write::

    def test_my_ema(rivervalley):
        w = rivervalley.check_affine_merge(my_ema, n=8, expected=rivervalley.weights.ema(8, 0.9))
        rivervalley.check_expected_gain(w, rivervalley.RiverValley(slope=0.3, lr=0.5, curvatures=(1.0, 0.2)))

Each test gets its own seed, derived from its node id and ``--rivervalley-seed`` (default 0), so a failure
reproduces and a different base seed re-draws every probe and simulation. Disable with
``-p no:rivervalley``. Importing this module is cheap: the checks load on first use.
"""

from __future__ import annotations

import functools
import zlib

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("rivervalley", "rivervalley.testing (merge property checks)")
    group.addoption(
        "--rivervalley-seed",
        type=int,
        default=0,
        help="base seed of the rivervalley fixture's probes and simulations (default 0)",
    )


class Kit:
    """What the ``rivervalley`` fixture gives: the checks with this test's seed, the parameter class, the
    weights and theory modules, and a seeded simulator."""

    _CHECKS = (
        "check_affine_merge",
        "check_exact_on_lines",
        "check_expected_gain",
        "check_extrapolation_limits",
    )

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __getattr__(self, name):
        from rivervalley import testing, theory, weights

        if name in self._CHECKS:
            return functools.partial(getattr(testing, name), seed=self.seed)
        if name in ("RiverValley", "BendingRiver", "GainCheck", "LimitCheck", "default_rtol"):
            return getattr(testing, name)
        if name == "weights":
            return weights
        if name == "theory":
            return theory
        raise AttributeError(f"the rivervalley fixture has no attribute {name!r}")

    def simulate(self, params, n: int, *, seeds: int = 1000, start: int = 0):
        """Checkpoints of the river valley ``params`` (a RiverValley), seeded for this test."""
        return params.simulate(n, seeds=seeds, seed=self.seed, start=start)

    def __repr__(self) -> str:
        return f"<rivervalley fixture seed={self.seed}>"


@pytest.fixture
def rivervalley_seed(request) -> int:
    """This test's seed: a hash of its node id plus ``--rivervalley-seed``."""
    base = request.config.getoption("rivervalley_seed", default=0) or 0
    return (zlib.crc32(request.node.nodeid.encode()) + int(base)) % 2**31


@pytest.fixture
def rivervalley(rivervalley_seed) -> Kit:
    """The rivervalley.testing checks, seeded for this test (see the module docstring)."""
    return Kit(rivervalley_seed)
