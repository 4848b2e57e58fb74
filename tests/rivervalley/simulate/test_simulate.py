"""The simulator: deterministic limits, symmetries, the exact fast path against stepping, and the first two
moments against THEORY.md §a–(c). Statistical checks use z-scores from standard errors estimated on the
same samples (|z| < Z_MAX), never fixed tolerances."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rivervalley.landscapes import HyperbolaRiver, MatrixLeastSquares, QuadraticRiverValley, SineRiver
from rivervalley.optimizers import SGD, Adam, Muon
from rivervalley.schedules import constant, cosine
from rivervalley.simulate import SimResult, checkpoint_steps, exact_transition, simulate

F64 = torch.float64
Z_MAX = 5.0  # P(|z| > 5) ≈ 6e-7 per comparison for a Gaussian statistic


# --------------------------------------------------------------------------------------------------
# statistics helpers


def _z_mean(x: torch.Tensor, target: float) -> float:
    """z-score of the sample mean of x (over seeds) against a target value."""
    x = x.double()
    return float((x.mean() - target) / (x.std() / math.sqrt(x.numel())))


def _z_moment(prod: torch.Tensor, target: float) -> float:
    """z-score of a second moment estimated as the mean of per-seed products (centred beforehand)."""
    return _z_mean(prod, target)


def _z_two_sample(x: torch.Tensor, y: torch.Tensor) -> float:
    """z-score of the difference of two independent sample means (deterministic samples, e.g. a shared
    starting point or a coordinate that ηλ = 1 zeroes, must agree to rounding instead)."""
    se = math.sqrt(float(x.var()) / x.numel() + float(y.var()) / y.numel())
    diff = float(x.mean() - y.mean())
    if se < 1e-10:
        return 0.0 if abs(diff) < 1e-9 else math.inf
    return diff / se


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


# --------------------------------------------------------------------------------------------------
# deterministic behaviour


@pytest.mark.parametrize("rotate", [False, True])
def test_noise_free_sgd_follows_closed_form(rotate):
    """v_t = (1 − ηλ)^t v_0 per valley coordinate, u_t = u_0 + ηct on the linear river; the exact path
    agrees at every checkpoint."""
    lam = np.array([0.5, 1.0, 2.5])
    q = QuadraticRiverValley(slope=2.0, curvatures=lam, rotate=rotate, seed=1)
    u0, v0 = 0.5, torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    theta0 = q.to_param(u0, v0)
    eta, steps = 0.1, 40
    res = simulate(q, steps=steps, lr=eta, ckpt_every=5, init=theta0, seeds=2)
    t = res.ckpt_steps
    np.testing.assert_array_equal(t, np.arange(0, 41, 5))
    expect_v = v0.numpy()[None, :] * (1 - eta * lam[None, :]) ** t[:, None]
    np.testing.assert_allclose(res.v()[0].numpy(), expect_v, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.u()[1].numpy(), u0 + eta * 2.0 * t, rtol=0, atol=1e-12)
    ex = simulate(q, steps=steps, lr=eta, ckpt_every=5, init=theta0, seeds=2, exact=True)
    torch.testing.assert_close(ex.checkpoints, res.checkpoints, rtol=0, atol=1e-11)
    torch.testing.assert_close(ex.final, res.final, rtol=0, atol=1e-11)
    # off the checkpoint grid: the last jump must not overwrite the last stored checkpoint
    off = simulate(q, steps=steps + 3, lr=eta, ckpt_every=5, ckpt_from=2, init=theta0, seeds=2)
    ex_off = simulate(q, steps=steps + 3, lr=eta, ckpt_every=5, ckpt_from=2, init=theta0, seeds=2, exact=True)
    torch.testing.assert_close(ex_off.checkpoints, off.checkpoints, rtol=0, atol=1e-11)
    torch.testing.assert_close(ex_off.final, off.final, rtol=0, atol=1e-11)


def test_noise_free_curved_river_relaxes_to_optimum():
    q = QuadraticRiverValley(slope=1.0, river_curvature=0.5, curvatures=[1.0])
    res = simulate(q, steps=30, lr=0.2, ckpt_every=3, init=q.to_param(-4.0, [0.0]), exact=True)
    r = (1 - 0.2 * 0.5) ** res.ckpt_steps
    np.testing.assert_allclose(res.u()[0].numpy(), 2.0 + (-4.0 - 2.0) * r, atol=1e-12)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(eta_lam=st.floats(0.01, 1.99), v0=st.floats(-3, 3), steps=st.integers(1, 60))
def test_noise_free_valley_property(eta_lam, v0, steps):
    q = QuadraticRiverValley(slope=0.0, curvatures=[1.0])
    res = simulate(q, steps=steps, lr=eta_lam, n_ckpts=1, ckpt_from=steps, init=q.to_param(0.0, [v0]))
    assert float(res.v()[0, 0, 0]) == pytest.approx(v0 * (1 - eta_lam) ** steps, abs=1e-12)


@pytest.mark.parametrize("rotate", [False, True])
def test_translating_the_start_along_the_river_translates_the_trajectory(rotate):
    q = QuadraticRiverValley(slope=1.0, curvatures=[0.3, 1.0, 1.7], rotate=rotate, seed=2)
    base = simulate(
        q, steps=50, lr=0.3, seeds=5, noise=0.7, river_noise=0.2, ckpt_every=10, init="stationary", seed=11
    )
    shift = 3.5 * q.river_direction()
    moved = simulate(
        q,
        steps=50,
        lr=0.3,
        seeds=5,
        noise=0.7,
        river_noise=0.2,
        ckpt_every=10,
        init=base.checkpoints[:, 0] + shift,
        seed=11,
    )
    # the same noise stream: base drew its stationary start from a separate generator
    torch.testing.assert_close(moved.checkpoints - shift, base.checkpoints, rtol=0, atol=1e-10)


def test_checkpoint_plans():
    assert checkpoint_steps(10, ckpt_every=3)[1].tolist() == [0, 3, 6, 9]
    assert checkpoint_steps(10, ckpt_every=3, ckpt_from=4)[1].tolist() == [4, 7, 10]
    steps, plan = checkpoint_steps(ckpt_every=5, n_ckpts=4, ckpt_from=2)
    assert steps == 17 and plan.tolist() == [2, 7, 12, 17]
    assert checkpoint_steps(100, n_ckpts=5, ckpt_from=20)[1].tolist() == [20, 40, 60, 80, 100]
    assert checkpoint_steps(7)[1].size == 0
    res = simulate(QuadraticRiverValley(), lr=0.1, ckpt_every=4, n_ckpts=3)
    assert res.steps == 8 and res.checkpoints.shape == (1, 3, 2)


def test_result_helpers_and_loss_curve():
    q = QuadraticRiverValley(slope=1.0, curvatures=[1.0, 2.0], rotate=True)
    res = simulate(q, steps=20, lr=0.1, seeds=3, ckpt_every=10, record_loss_every=5, noise=0.1)
    assert isinstance(res, SimResult)
    assert res.u().shape == (3, 3) and res.v().shape == (3, 3, 2) and res.ckpt_loss.shape == (3, 3)
    torch.testing.assert_close(res.ckpt_loss[:, -1], q.loss(res.final))
    assert res.loss_steps.tolist() == [0, 5, 10, 15, 20]
    assert res.loss_curve[0] == 0.0 and np.all(np.diff(res.loss_curve) < 0)


def test_schedules_and_other_optimizers_run():
    q = QuadraticRiverValley(slope=1.0, curvatures=[1.0, 3.0], rotate=True)
    a = simulate(q, SGD(momentum=0.9), steps=30, lr=cosine(0.05, 30), seeds=4, noise=0.1, ckpt_every=10)
    b = simulate(q, Adam(), steps=30, lr=lambda t: 0.01, seeds=4, ckpt_every=10)
    assert a.u()[:, -1].mean() > 0 and b.u()[:, -1].mean() > 0
    m = MatrixLeastSquares(a=4, b=6, seed=0)
    res = simulate(m, Muon(m.shape), steps=40, lr=0.02, seeds=3, noise=0.05, ckpt_every=20)
    assert (res.ckpt_loss[:, -1] < res.ckpt_loss[:, 0]).all()
    for river in (SineRiver(), HyperbolaRiver()):
        r = simulate(
            river,
            steps=50,
            lr=0.01,
            seeds=3,
            noise=0.1,
            river_noise=0.0,
            ckpt_every=25,
            init=river.floor([0.0])[0],
            noise_kind="minibatch",
        )
        assert (r.u()[:, -1] > 0).all()


# --------------------------------------------------------------------------------------------------
# the exact fast path against stepping, in distribution


def _compare_distributions(a: torch.Tensor, b: torch.Tensor, max_lag: int = 1):
    """a, b: [S, N, k] samples of two independent simulations. Compares the means, variances and lag-h
    covariances (h ≤ max_lag) of every coordinate at every checkpoint with two-sample z-scores."""
    ca, cb = _centred(a), _centred(b)
    zs = []
    n = a.shape[1]
    for i in range(n):
        zs.append(_z_two_sample(a[:, i], b[:, i]))
        for lag in range(0, max_lag + 1):
            if i + lag < n:
                zs.append(_z_two_sample(ca[:, i] * ca[:, i + lag], cb[:, i] * cb[:, i + lag]))
    return np.abs(np.asarray(zs)).max()


@pytest.mark.parametrize(
    "kw",
    [
        {
            "landscape": QuadraticRiverValley(slope=1.0, curvatures=[0.4, 1.5, 6.0]),
            "noise_kind": "additive",
            "init": "stationary",
        },
        {
            "landscape": QuadraticRiverValley(
                slope=0.5, river_curvature=0.3, curvatures=[1.0, 8.0], rotate=True
            ),
            "noise_kind": "minibatch",
            "init": "stationary",
            "river_start": -3.0,
        },
        {
            "landscape": MatrixLeastSquares(a=2, b=3, slope=1.0, input_cov_spectrum=[0.5, 2.0, 5.0]),
            "noise_kind": "additive",
            "init": "zero",
        },
        {
            "landscape": QuadraticRiverValley(slope=1.0, curvatures=[0.4, 1.5, 6.0]),
            "noise_kind": "minibatch",
            "init": "stationary",
            "noise_backend": "torch",
        },
    ],
    ids=["linear-river", "curved-rotated-minibatch", "matrix-from-zero", "linear-river-torch-sampler"],
)
def test_exact_path_matches_step_path_in_distribution(kw):
    kw = dict(kw)
    landscape = kw.pop("landscape")
    common = dict(steps=48, lr=0.2, seeds=4000, noise=1.0, river_noise=0.5, ckpt_every=8, **kw)
    stepped = simulate(landscape, seed=1, **common)
    exact = simulate(landscape, seed=2, exact=True, **common)
    za = landscape.to_eigen(stepped.checkpoints.reshape(-1, landscape.dim)).reshape(4000, -1, landscape.dim)
    zb = landscape.to_eigen(exact.checkpoints.reshape(-1, landscape.dim)).reshape(4000, -1, landscape.dim)
    assert _compare_distributions(za, zb) < Z_MAX
    # and the comparison has power: a 10% larger noise is detected
    louder = simulate(landscape, seed=3, exact=True, **{**common, "noise": 1.1})
    zc = landscape.to_eigen(louder.checkpoints.reshape(-1, landscape.dim)).reshape(4000, -1, landscape.dim)
    assert _compare_distributions(za, zc) > Z_MAX


def test_native_and_torch_noise_backends_agree_in_distribution():
    """The compiled Philox kernel (fused update) and torch's sampler (separate draw) give the same law."""
    q = QuadraticRiverValley(slope=1.0, curvatures=[0.3, 1.0, 4.0], rotate=False)
    common = dict(steps=40, lr=0.3, seeds=4000, noise=1.0, river_noise=0.7, ckpt_every=10, init="stationary")
    a = simulate(q, seed=1, noise_backend="native", **common)
    b = simulate(q, seed=1, noise_backend="torch", **common)
    assert (a.config["noise_backend"], b.config["noise_backend"]) == ("native", "torch")
    assert _compare_distributions(a.checkpoints, b.checkpoints) < Z_MAX
    louder = simulate(q, seed=2, noise_backend="torch", **{**common, "noise": 1.1})
    assert _compare_distributions(a.checkpoints, louder.checkpoints) > Z_MAX


# --------------------------------------------------------------------------------------------------
# first two moments against THEORY.md


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    eta_lam=st.floats(0.05, 1.9),
    s=st.integers(1, 12),
    sigma=st.floats(0.2, 2.0),
    sigma_u=st.one_of(st.just(0.0), st.floats(0.1, 1.0)),
    kind=st.sampled_from(["additive", "minibatch"]),
)
def test_exact_path_moments_match_theory(eta_lam, s, sigma, sigma_u, kind):
    """Stationary valley: Var v = V = ησ_i²/(λ(2 − ηλ)), Cov(v^(k), v^(k+1)) = Vρ with ρ = (1 − ηλ)^s;
    linear river: mean drift D = ηcs per checkpoint with increment variance η²σ_u²s (THEORY §a, §c)."""
    eta, lam, c, seeds = 0.1, eta_lam / 0.1, 1.5, 20000
    q = QuadraticRiverValley(slope=c, curvatures=[lam])
    res = simulate(
        q,
        steps=3 * s,
        lr=eta,
        seeds=seeds,
        noise=sigma,
        river_noise=sigma_u,
        noise_kind=kind,
        ckpt_every=s,
        init="stationary",
        exact=True,
        seed=7,
    )
    sig_i = sigma * (math.sqrt(lam) if kind == "minibatch" else 1.0)
    V = eta * sig_i**2 / (lam * (2 - eta_lam))
    rho = (1 - eta_lam) ** s
    v = res.v()[:, :, 0]
    vc = v - v.mean(0)
    for k in range(4):
        assert abs(_z_mean(v[:, k], 0.0)) < Z_MAX
        assert abs(_z_moment(vc[:, k] ** 2, V)) < Z_MAX
    for k in range(3):
        assert abs(_z_moment(vc[:, k] * vc[:, k + 1], V * rho)) < Z_MAX
    du = res.u()[:, 1:] - res.u()[:, :-1]
    D = eta * c * s
    if sigma_u > 0:
        for k in range(3):
            assert abs(_z_mean(du[:, k], D)) < Z_MAX
            assert abs(_z_moment(_centred(du[:, k]) ** 2, eta**2 * sigma_u**2 * s)) < Z_MAX
    else:
        torch.testing.assert_close(du, torch.full_like(du, D))


def test_exact_transition_formulas():
    q = QuadraticRiverValley(slope=2.0, river_curvature=0.0, curvatures=[1.0, 30.0])
    rho, drift, innov = exact_transition(q, 0.05, 4, np.array([0.3, 1.0, 1.0]))
    np.testing.assert_allclose(rho, [1.0, 0.95**4, (-0.5) ** 4])
    np.testing.assert_allclose(drift, [0.05 * 2.0 * 4, 0.0, 0.0], atol=1e-15)
    V = 0.05 / (1.0 * 1.95)
    np.testing.assert_allclose(innov[1] ** 2, V * (1 - 0.95**8))
    np.testing.assert_allclose(innov[0] ** 2, 0.05**2 * 0.09 * 4)


def test_stationary_init_has_the_stationary_variance():
    q = QuadraticRiverValley(slope=1.0, curvatures=[0.5, 2.0, 10.0], rotate=True, seed=4)
    res = simulate(q, steps=0, lr=0.15, seeds=20000, noise=1.3, n_ckpts=1, init="stationary")
    V = q.stationary_variance(0.15, 1.3)[1:]
    v = res.v()[:, 0]
    for i in range(3):
        assert abs(_z_moment(_centred(v[:, i]) ** 2, V[i])) < Z_MAX
    assert res.u().abs().max() < 1e-12  # linear river: starts at u = 0 exactly


# --------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"init": "stationary", "lr": 0.5}, "lr"),  # ηλ = 2.5 ∉ (0, 2)
        ({"lr": float("nan")}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"noise": float("nan")}, "noise"),
        ({"river_noise": -1.0}, "river_noise"),
        ({"ckpt_every": 0}, "ckpt_every"),
        ({"n_ckpts": 0}, "n_ckpts"),
        ({"ckpt_every": 3, "n_ckpts": 9}, "n_ckpts"),
        ({"ckpt_from": 50}, "ckpt_from"),
        ({"seeds": 0}, "seeds"),
        ({"noise_kind": "pink"}, "noise_kind"),
        ({"init": "random"}, "init"),
        ({"init": torch.zeros(3)}, "init"),
        ({"init": torch.full((4,), float("nan"))}, "init"),
        ({"river_start": 1.0}, "river_start"),
        ({"record_loss_every": 0}, "record_loss_every"),
        ({"exact": True, "record_loss_every": 2}, "record_loss_every"),
        ({"exact": True, "lr": cosine(0.1, 10)}, "constant lr"),
        ({"exact": True, "optimizer": SGD(momentum=0.9)}, "plain SGD"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(kw, name):
    q = QuadraticRiverValley(slope=1.0, curvatures=[1.0, 2.0, 5.0])
    kw = {"steps": 10, "lr": 0.1, "ckpt_every": 2, **kw}
    optimizer = kw.pop("optimizer", None)
    with pytest.raises(ValueError, match=name):
        simulate(q, optimizer, **kw)


def test_exact_needs_a_quadratic_and_stationary_needs_one():
    with pytest.raises(ValueError, match="quadratic"):
        simulate(SineRiver(), steps=5, lr=0.1, exact=True)
    with pytest.raises(ValueError, match="quadratic"):
        simulate(HyperbolaRiver(), steps=5, lr=0.1, init="stationary")
    with pytest.raises(ValueError, match="curvatures"):
        QuadraticRiverValley(curvatures=[-1.0])
    assert simulate(QuadraticRiverValley(), steps=3, lr=constant(0.1), exact=True).final.shape == (1, 2)


def test_noise_source_is_independent_of_threads_and_prefetch():
    """Large batches are drawn by background threads into alternating buffers; the numbers must not
    depend on the thread count nor on prefetching (they equal a synchronous draw)."""
    from rivervalley.simulate.noise import NoiseSource as _NoiseSource

    shape = (256, 512)  # 2^17 entries: the threaded, prefetching path
    sources = [_NoiseSource(shape, 3, torch.float32, "cpu", out_dtype=F64, threads=t) for t in (1, 2, 4)]
    sync = _NoiseSource(shape, 3, torch.float32, "cpu", out_dtype=F64)
    sync.pool.shutdown()
    sync.pool = None
    try:
        for _ in range(3):
            ref = sync.draw().clone()
            for src in sources:
                assert torch.equal(src.draw(), ref)
    finally:
        for src in sources:
            src.close()


def test_simulate_refuses_an_allocation_larger_than_available_memory(monkeypatch, capsys):
    """The checkpoint buffer is estimated first: a run that cannot fit is refused with the number it needs,
    before anything is allocated (here the memory available is pretended to be 1 MB)."""
    from rivervalley import cli
    from rivervalley.common import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 10**6)
    land = QuadraticRiverValley(slope=1.0, m=9)
    # 8 B x 1000 x 10 x (101 checkpoints + 4 state) + 8 B x 1000 x 103 results + schedule 3208 B + noise:
    # torch 2 x 12 B x 1000 x 10 (float32 draws and their float64 copies), native one 8 B x 1000 x 10 buffer
    need = r"1000 seeds x 101 checkpoints x 10 parameters .* needs about (9\.03|8\.88) MiB"
    with pytest.raises(ValueError, match=need):
        simulate(land, lr=0.1, steps=100, seeds=1000, ckpt_every=1)
    simulate(land, lr=0.1, steps=100, seeds=10, ckpt_every=10)  # 10 x 11 x 10 doubles fit
    assert cli.main(["simulate", "--m", "9", "--seeds", "1000", "--steps", "100", "--ckpt-every", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rivervalley: error: simulate with 1000 seeds")


def test_available_memory_reads_the_machine():
    from rivervalley.common.resources import available_memory

    have = available_memory()
    assert have is None or have > 0
