"""The simulated evaluator (extramerge.study.simulated) is exact, and the study's choice runs on it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from extramerge.study.choose import choose
from extramerge.study.core import StudyConfig
from extramerge.study.evaluator import paired_delta
from extramerge.study.sim_validation import score_run
from extramerge.study.simulated import SimSpec, simulate_runs
from rivervalley import weights as W
from rivervalley.landscapes import SineRiver

SMALL = dict(m=8, noise=0.09 * 8, docs=40)  # same valley loss as the default 512 directions


def _cfg():
    return StudyConfig(checkpoints=[], out=Path("unused"))


def test_doc_losses_are_exact_straight_and_curved():
    for river in ("straight", "curved"):
        run = simulate_runs(SimSpec(river=river, **SMALL), 1, seed=3)[0]
        sp, n = run.spec, run.n
        w = np.random.default_rng(0).normal(size=n)
        w /= w.sum()
        th = (torch.as_tensor(w) @ run.checkpoints).numpy()
        u, v = th[0], th[1:]
        mu = 0.0 if river == "straight" else run._loss.quad.river_curvature
        assert (mu > 0) == (river == "curved")
        L = -sp.slope * u + 0.5 * mu * u * u + 0.5 * run.lam @ (v * v)
        assert run.population_loss(w) == pytest.approx(L, rel=1e-12, abs=1e-12)
        for half in ("calib", "test"):
            h = run.halves[half]
            dl = run.measure(w, half)
            assert np.array_equal(dl.tokens, h.tokens) and np.all(h.tokens >= 1)
            per_token = h.const + L + h.a * u - h.delta @ (run.lam * v)
            np.testing.assert_allclose(dl.nll, h.tokens * per_token, rtol=1e-12)
            assert dl.loss == pytest.approx((h.tokens * per_token).sum() / h.tokens.sum(), rel=1e-12)
            assert run.measure(w, half) is dl  # memoised
        assert not np.array_equal(run.halves["calib"].a, run.halves["test"].a)  # different documents


def test_bending_river_population_loss_is_the_landscapes():
    run = simulate_runs(SimSpec(river="bending", schedule="wsd", **SMALL), 1, seed=1)[0]
    sine = run._loss.sine
    assert isinstance(sine, SineRiver)
    assert torch.all(run.checkpoints[:, 2] == 0)  # the quadratic part has no river: it stays at 0
    w = W.extra(run.n, 4, 4, 1.0)
    th = torch.as_tensor(w) @ run.checkpoints
    L = float(sine.loss(th[:2])) + 0.5 * float(run.lam[1:] @ (th[3:] ** 2).numpy())
    assert run.population_delta(w) == pytest.approx(L - run.population_loss(np.eye(run.n)[-1]), abs=1e-12)
    # the checkpoints straddle the crest of the sine (x/ℓ = π/2): the floor bends over them
    x = run.checkpoints[:, 0].numpy() / sine.length
    assert x[0] < np.pi / 2 < x[-1]


def test_without_document_noise_paired_deltas_are_the_population_deltas():
    run = simulate_runs(SimSpec(river_tau=0.0, valley_tau=0.0, **SMALL), 1, seed=2)[0]
    last = run.measure(np.eye(run.n)[-1], "test")
    for w in (W.sma(run.n, 4), W.extra(run.n, 4, 2, 1.5), W.ema(run.n, 0.8)):
        d, se = paired_delta(run.measure(w, "test"), last)
        assert d == pytest.approx(run.population_delta(w), abs=1e-12)
        assert se < 1e-12


def test_choose_runs_end_to_end_and_is_scored():
    run = simulate_runs(SimSpec(schedule="cosine", river="bending", **SMALL), 1, seed=0)[0]
    row = score_run(run, _cfg())
    assert row["recommendation"] in {c["name"] for c in row["candidates"] if not c["diagnostic"]}
    assert row["regret"] >= 0
    assert {c["offset"] for c in row["alpha"]} == {2, 4, 8}
    assert all(c["exact"] == pytest.approx(0.0, abs=1e-15) for c in row["candidates"] if c["is_last"])


def test_straight_constant_river_with_many_documents():
    """The model's own form: the recommendation gets ≥ 90% of the menu's best exact gain, the fit is
    trusted, an identified α* lies within 0.1 of α_opt, and the gate opens in at least one of two runs."""
    cfg = _cfg()
    runs = simulate_runs(SimSpec(spacing=32, docs=1000), 2, seed=0)
    opened = 0
    for run in runs:
        ch = choose(run, run.grid(), run.n, cfg, lambda: None)
        ex = {id(c): run.population_delta(c["weights"]) for c in ch.menu}
        best = min(ex.values())
        assert best < -0.01
        assert ex[id(ch.recommendation)] <= 0.9 * best
        assert ch.trusted
        grid = np.arange(-1.0, 3.0, 0.01)
        for d, th in ch.theory.items():
            if th["identified"]:
                a_opt = grid[np.argmin([run.population_loss(W.extra(run.n, 4, d, a)) for a in grid])]
                assert abs(th["alpha_star"] - a_opt) <= 0.1, (d, th["alpha_star"], a_opt)
        opened += not ch.gate
    assert opened >= 1
