"""rivervalley.estimate: the river-valley model with the learning rate at each checkpoint (THEORY §g)."""

import math

import numpy as np
import pytest

from rivervalley import estimate as est
from rivervalley import schedules, theory
from rivervalley import weights as W


def _losses(grid, beta, rho, cal):
    X = est.design(np.stack(list(cal.values())), grid, rho)
    return X @ beta


@pytest.mark.parametrize("decay", [False, True])
def test_fit_recovers_exact_parameters(decay):
    n = 12
    if decay:
        grid = est.Grid.from_schedule(np.arange(n) * 40 + 400, schedules.wsd(0.01, 900, decay_steps=500))
    else:
        grid = est.Grid.constant(n)
    rho = est.RHO_GRID[30]
    beta = np.array([2.0, -0.03, 0.002, 0.05, 0.08, 1e-4])
    cal = est.calibration_weights(n)
    f = est.fit(list(cal.values()), _losses(grid, beta, rho, cal), grid, bend=True)
    assert f.rho == rho
    np.testing.assert_allclose(f.best.beta, beta, atol=1e-9)
    assert f.slope.value == pytest.approx(0.03) and f.slope.lo <= 0.03 <= f.slope.hi


def test_calibration_merges_stay_inside_the_data():
    for n in (4, 9, 16):
        for w in est.calibration_weights(n).values():
            assert w.min() >= 0 and w.sum() == pytest.approx(1) and W.lag(w) >= 0


@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_constant_lr_prediction_is_theory_weights_delta_loss(rho):
    """With a constant lr and F2 = 0 the model is §d': c²ηs = −F1, curvatures (1, 1 − ρ), σ² = 2ω(2 − λ)."""
    n = 10
    grid = est.Grid.constant(n)
    beta = np.array([1.0, -0.02, 0.0, 0.04, 0.07, 0.0])
    lam = np.array([1.0, 1.0 - rho])
    noise = np.sqrt(2 * beta[3:5] * (2 - lam))
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = rng.normal(size=n)
        w /= w.sum()
        ref = theory.weights_delta_loss(
            w, slope=math.sqrt(0.02), lr=1, interval=1, curvatures=lam, noise=noise
        )
        X = est.design(np.stack([w, np.eye(n)[-1]]), grid, rho)
        assert (X[0] - X[1]) @ beta == pytest.approx(float(ref), rel=1e-9, abs=1e-12)


def test_grid_from_schedule():
    g = est.Grid.from_schedule([100, 200, 300, 400], schedules.constant(0.1))
    np.testing.assert_allclose(g.area, [0, 1, 2, 3])
    np.testing.assert_allclose(g.lr_ratio, 1)
    g = est.Grid.from_schedule([100, 200, 300, 400], ([0, 250, 400], [1.0, 1.0, 0.0]))
    assert g.lr_ratio[-1] == 0 and g.lr_ratio[0] == 1 and np.all(np.diff(g.area) > 0) and g.area[-1] == 3
    with pytest.raises(ValueError, match="covers 150..400"):
        est.Grid.from_schedule([100, 200], ([150, 400], [1.0, 1.0]))
    with pytest.raises(ValueError, match="zero"):
        est.Grid.from_schedule([100, 200], ([0, 400], [0.0, 0.0]))


def test_slow_variance_follows_the_exact_recursion():
    """§g: V_{t+1} = (1 − η_tλ)² V_t + η_t²σ² against the relaxation in area units, on a cosine decay."""
    sched = schedules.cosine(0.02, 3000, final_lr=0.0)
    steps = np.arange(8) * 250 + 1000
    lam = 0.1
    eta = sched(np.arange(3000))
    V = eta[0] / (lam * (2 - eta[0] * lam))
    exact = []
    for t in range(steps[-1]):
        if t in steps:
            exact.append(V)
        V = (1 - eta[t] * lam) ** 2 * V + eta[t] ** 2
    exact.append(V)
    exact = np.array(exact[: len(steps)])
    g = est.Grid.from_schedule(steps, sched, history_intervals=40)
    unit = np.sum(eta[steps[0] : steps[-1]]) / (len(steps) - 1)
    rho = math.exp(-lam * unit)
    peak = eta[steps].max()
    model = g.slow_variance(rho) * peak / (lam * (2 - peak * lam))
    np.testing.assert_allclose(model, exact, rtol=0.05)


def test_alpha_star_and_optimal_weights_minimise_the_prediction():
    n = 12
    grid = est.Grid.constant(n)
    cal = est.calibration_weights(n)
    rng = np.random.default_rng(1)
    y = _losses(grid, np.array([2.0, -0.02, 0.0, 0.03, 0.05, 0.0]), 0.7, cal) + rng.normal(0, 1e-4, len(cal))
    f = est.fit(list(cal.values()), y, grid)
    fam = lambda a: W.extra(n, 4, 4, a)  # noqa: E731
    a = f.alpha_star(fam)
    grid_a = np.linspace(a - 1, a + 1, 201)
    assert min(grid_a, key=lambda x: f.predict(fam(x)).value) == pytest.approx(a, abs=0.011)
    w = f.optimal_weights()
    base = f.predict(w).value
    for _ in range(20):
        e = rng.normal(size=n) * 0.05
        e -= e.mean()
        assert f.predict(w + e).value >= base - 1e-12


def test_document_sampling_widens_the_intervals():
    n = 10
    grid = est.Grid.constant(n)
    cal = est.calibration_weights(n)
    rng = np.random.default_rng(2)
    D = 12
    tok = rng.integers(500, 1500, D).astype(float)
    per_doc = _losses(grid, np.array([2.0, -0.02, 0.0, 0.03, 0.05, 0.0]), 0.5, cal)[:, None] + rng.normal(
        0, 0.05, (len(cal), D)
    )
    nll = per_doc * tok
    y = nll.sum(1) / tok.sum()
    plain = est.fit(list(cal.values()), y, grid)
    with_docs = est.fit(list(cal.values()), y, grid, docs=(nll, tok))
    w = W.sma(n, 4)
    a, b = plain.predict(w), with_docs.predict(w)
    assert a.value == b.value and b.hi - b.lo > a.hi - a.lo
    with pytest.raises(ValueError, match="docs"):
        est.fit(list(cal.values()), y, grid, docs=(nll[:-1], tok))


def test_fit_rejects_bad_input():
    cal = list(est.calibration_weights(8).values())
    with pytest.raises(ValueError, match="one loss per weight vector"):
        est.fit(cal, np.ones(len(cal) - 1))
    y = np.ones(len(cal))
    y[3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        est.fit(cal, y)
    with pytest.raises(ValueError, match="at least 3"):
        est.calibration_weights(2)


def test_bend_term_is_the_sagitta_of_a_curved_path():
    """Checkpoints on θ(A) = a·A + ½·b·A² (b ⊥ a): the merge leaves the path by ½·b·B(w), and a quadratic
    valley across b charges λ_b|½bB|²/2: the model's κ·B(w)² with κ = λ_b|b|²/8."""
    n = 9
    grid = est.Grid.constant(n)
    A = grid.area - grid.area[-1]
    a, b = np.array([1.0, 0.0]), np.array([0.0, 0.3])
    theta = np.outer(A, a) + 0.5 * np.outer(A * A, b)
    lam_b = 2.0
    rng = np.random.default_rng(3)
    for _ in range(5):
        w = rng.normal(size=n)
        w /= w.sum()
        m = w @ theta
        s = m @ a
        off = m - (s * a + 0.5 * s * s * b)  # distance from the path point at the same river position
        loss = 0.5 * lam_b * (off @ off) / (b @ b) * (b @ b)
        B2 = est.features(w, grid, 0.5)[5]
        assert loss == pytest.approx(lam_b * (b @ b) / 8 * B2, rel=1e-9)


def test_a_bend_pulls_alpha_star_towards_zero():
    n = 12
    grid = est.Grid.constant(n)
    cal = est.calibration_weights(n)
    fam = lambda a: W.extra(n, 4, 4, a)  # noqa: E731
    stars = []
    for kappa in (0.0, 1e-5, 1e-4):
        beta = np.array([2.0, -0.03, 0.0, 0.01, 0.0, kappa])
        f = est.fit(list(cal.values()), _losses(grid, beta, 0.5, cal), grid, rho=0.5, bend=True)
        stars.append(f.alpha_star(fam))
    assert stars[0] > stars[1] > stars[2] > 0


def test_simulated_slope_is_recovered():
    """rivervalley.estimate_validation on a well-specified scenario: the median slope within 10%."""
    from rivervalley import estimate_validation as V

    r = V.validate_scenario(V.Scenario("constant", 32, "two-group"), seeds=16)
    assert abs(r["slope_rel_error"]) < 0.10
    assert 0 <= r["slope_coverage"] <= 1 and r["valley_true"] > 0
