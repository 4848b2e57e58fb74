"""rivervalley.testing's strategies, its RiverValley parameters and its pytest plugin (a `rivervalley`
fixture registered through the pytest11 entry point)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import find as _find

from rivervalley import landscapes as L
from rivervalley.testing import RiverValley
from rivervalley.testing.strategies import (
    checkpoint_sets,
    landscapes,
    merges,
    river_valleys,
    trajectories,
)

FAST = settings(max_examples=30, deadline=None)
FIRST = settings(max_examples=200, phases=(Phase.generate,), database=None)  # no shrinking: any example


def find(strategy, condition):
    return _find(strategy, condition, settings=FIRST)


pytest_plugins = ["pytester"]


def test_river_valleys_cover_negative_rho_and_curved_rivers():
    negative = find(river_valleys(), lambda p: p.rho.min() < 0)
    assert negative.lr * max(negative.curvatures) > 1 and negative.interval % 2 == 1
    curved = find(river_valleys(curved=None), lambda p: p.curved)
    assert curved.e0 < 0 and curved.river_optimum > 0
    positive_only = find(river_valleys(negative_rho=False), lambda p: True)
    assert positive_only.rho.min() > 0


@FAST
@given(params=river_valleys(curved=None))
def test_river_valleys_are_stable(params):
    assert np.all(np.abs(params.rho) < 1) and np.all(params.omega > 0)
    assert np.isfinite(params.delta_loss(np.array([0.5, 0.5])))


@FAST
@given(land=landscapes())
def test_landscapes_of_every_kind_evaluate(land):
    theta = torch.randn(3, land.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(land.loss(theta)).all() and land.grad(theta).shape == theta.shape


def test_landscape_kinds_are_all_reachable():
    for kind, cls in [
        ("sine", L.SineRiver),
        ("hyperbola", L.HyperbolaRiver),
        ("matrix", L.MatrixLeastSquares),
    ]:
        assert isinstance(find(landscapes(kinds=(kind,)), lambda _: True), cls)
    curved = find(landscapes(kinds=("curved",)), lambda _: True)
    assert curved.river_curvature > 0
    with pytest.raises(ValueError, match="kinds"):
        find(landscapes(kinds=("spiral",)), lambda _: True)


@FAST
@given(merge=merges())
def test_merges_are_affine_and_say_what_they_are(merge):
    assert merge.weights.sum() == pytest.approx(1.0)
    assert repr(merge).startswith(f"Merge({merge.method!r}, n={merge.n}")


def test_every_merge_method_is_drawn():
    for method in ("sma", "ema", "wma", "extra", "trend", "affine"):
        assert find(merges(methods=(method,)), lambda _: True).method == method


@settings(max_examples=10, deadline=None)
@given(traj=trajectories(n=5, seeds=16))
def test_trajectories_have_known_parameters(traj):
    assert traj.checkpoints.shape == (16, 5, 1 + len(traj.params.curvatures))
    assert isinstance(traj.params, RiverValley) and np.isfinite(traj.checkpoints).all()


@FAST
@given(states=checkpoint_sets(dtypes=("float32", "bfloat16")))
def test_checkpoint_sets_share_keys_shapes_and_dtypes(states):
    first = states[0]
    for k, state in enumerate(states, start=1):
        assert state.keys() == first.keys()
        assert all(v.shape == first[name].shape and v.dtype == first[name].dtype for name, v in state.items())
        assert int(state["step"]) == k


# ------------------------------------------------------------------------------------------- plugin


def test_plugin_is_registered_through_the_pytest11_entry_point():
    eps = importlib.metadata.entry_points(group="pytest11")
    assert any(ep.name == "rivervalley" and ep.value == "rivervalley.testing.plugin" for ep in eps), (
        "the installed package does not register rivervalley.testing.plugin: reinstall it (pip install -e .)"
    )


USER_TEST = textwrap.dedent(
    """
    import numpy as np

    def sma_off_by_one(x, K=4):
        return x[-K - 1 : -1].mean(0)

    def test_seeded_and_checks(rivervalley):
        assert rivervalley.seed == rivervalley_seed_value()
        sma = rivervalley.weights.sma(8, 4)
        w = rivervalley.check_affine_merge(lambda x: x[-4:].mean(0), 8, expected=sma)
        assert np.allclose(w, sma)
        params = rivervalley.RiverValley(slope=0.3, lr=0.5, interval=2, curvatures=(1.0, 0.2))
        assert abs(rivervalley.check_expected_gain(w, params, seeds=500).z) < 4

    def test_catches_the_user_bug(rivervalley):
        rivervalley.check_affine_merge(sma_off_by_one, 8, expected=rivervalley.weights.sma(8, 4))

    def rivervalley_seed_value():
        import zlib
        return zlib.crc32(b"test_user.py::test_seeded_and_checks") % 2**31
    """
)


def test_fixture_in_a_user_test_suite(pytester):
    """A user's test file, run in a fresh pytest process that loads the plugin from the entry point."""
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*off-by-one window?*"])
    seeded = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--rivervalley-seed", "5")
    seeded.assert_outcomes(failed=2)  # a different base seed: test_seeded_and_checks sees its new seed


def test_kit_needs_no_hypothesis_and_its_plugin_no_torch():
    """hypothesis stays an optional extra, and pytest's start-up import of the plugin stays cheap."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["hypothesis"] = None  # as if it were not installed
        import rivervalley.testing.plugin
        assert "torch" not in sys.modules, "the plugin imported torch"
        from rivervalley.testing import check_affine_merge
        check_affine_merge(lambda x: x[-2:].mean(0), 4, expected=[0, 0, 0.5, 0.5])
        try:
            import rivervalley.testing.strategies
        except ImportError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "rivervalley.testing.strategies needs hypothesis: pip install" in out
