"""The weight vectors practical tools use: decay-curve merges (WSM / Megatron weighted_merge.py) and post-hoc
EMA profiles (EDM2 / ema-pytorch PostHocEMA), each checked against an independent computation: a real
torch SGD run whose learning rate decays, numerical integration of the profiles, and the EMA recurrence
run step by step."""

import math

import numpy as np
import pytest
import torch

from rivervalley import weights as W


def _quad(f, lo, hi, n=200_001):
    """∫_lo^hi f by the trapezoid rule on a fine grid (independent of the closed forms)."""
    x = np.linspace(lo, hi, n)
    y = f(x)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


# ----------------------------------------------------------------------------------------- decay curves


@pytest.mark.parametrize("n,K", [(1, 1), (5, 5), (9, 4), (12, 7)])
def test_linear_decay_is_the_uniform_average_of_the_window(n, K):
    np.testing.assert_allclose(W.decay(n, K, "linear"), W.sma(n, K), atol=1e-15)


def test_decay_values_by_hand_and_megatron_spellings():
    # K = 4, minus-sqrt: s = 1, 1−√¼, 1−√½, 1−√¾, 0 → c_k = s_k − s_{k+1}
    want = [0.5, math.sqrt(0.5) - 0.5, math.sqrt(0.75) - math.sqrt(0.5), 1 - math.sqrt(0.75)]
    np.testing.assert_allclose(W.decay(6, 4, "minus_sqrt"), [0, 0, *want], atol=1e-15)
    np.testing.assert_allclose(W.decay(4, shape="minus-sqrt"), want, atol=1e-15)
    cos = W.decay(5, 5, "cosine")  # symmetric about the window's middle, like (1 + cos πx)/2
    np.testing.assert_allclose(cos, cos[::-1], atol=1e-15)
    for shape in ("linear", "minus_sqrt", "cosine"):
        w = W.decay(10, 6, shape)
        assert w.shape == (10,) and w.dtype == np.float64 and abs(w.sum() - 1) < 1e-12
        assert np.all(w >= 0) and np.all(w[:4] == 0)
        np.testing.assert_allclose(W.emulated_decay(w)[4:], W.SHAPES[shape](np.arange(1, 6) / 6), atol=1e-14)
    with pytest.raises(ValueError, match="shape must be one of"):
        W.decay(4, 4, "step")
    with pytest.raises(ValueError, match="decay\\(window=5\\) needs at least 5"):
        W.decay(4, 5)
    with pytest.raises(ValueError, match="window must be an integer"):
        W.decay(4, 0)


def _sgd_run(theta0, grads, multipliers):
    """A real torch SGD run on the linear loss g_tᵀθ (gradients independent of θ), the learning rate of
    step t scaled by multipliers[t] through LambdaLR; returns θ after every step."""
    theta = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([theta], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: float(multipliers[min(t, len(multipliers) - 1)]))
    out = []
    for g in grads:
        opt.zero_grad()
        (g @ theta).backward()
        opt.step()
        sched.step()
        out.append(theta.detach().clone())
    return out


@pytest.mark.parametrize("shape", ["linear", "minus_sqrt", "cosine"])
@pytest.mark.parametrize("every", [1, 3])
def test_decay_merge_equals_the_run_whose_learning_rate_decays(shape, every):
    # 11 checkpoints every `every` steps at a constant rate; merge the last K = 6 with the decay weights.
    # The same gradients applied with the rate scaled by s_k on checkpoint interval k of the window (a
    # staircase at checkpoint granularity) must land exactly on the merge.
    torch.manual_seed(0)
    n, K, p = 11, 6, 5
    steps = (n - 1) * every
    grads = torch.randn(steps, p, dtype=torch.float64)
    theta0 = torch.randn(p, dtype=torch.float64)
    constant = _sgd_run(theta0, grads, np.ones(steps))
    ckpts = torch.stack([theta0] + constant[every - 1 :: every])  # θ at steps 0, every, 2·every, ...
    assert ckpts.shape == (n, p)
    merged = W.apply(W.decay(n, K, shape), ckpts.numpy())

    s = W.SHAPES[shape](np.arange(1, K) / K)  # multiplier of window interval k = 1..K−1
    before = (n - K) * every  # steps before the window's first checkpoint keep the full rate
    staircase = np.concatenate([np.ones(before), np.repeat(s, every)])
    decayed = _sgd_run(theta0, grads, staircase)[-1].numpy()
    np.testing.assert_allclose(merged, decayed, rtol=0, atol=1e-12)
    assert np.abs(merged - ckpts[-1].numpy()).max() > 1e-2  # the decay did move the model

    if every > 1:  # a per-step (smooth) decay is a different run: the identity is at checkpoint granularity
        x = (np.arange(steps - before) + 1) / (K * every)
        smooth = np.concatenate([np.ones(before), W.SHAPES[shape](np.minimum(x, 1))])
        assert np.abs(_sgd_run(theta0, grads, smooth)[-1].numpy() - merged).max() > 1e-3


def test_emulated_decay_of_sma_and_ema():
    np.testing.assert_allclose(W.emulated_decay(W.sma(8, 8)), 1 - np.arange(1, 8) / 8, atol=1e-15)
    np.testing.assert_allclose(W.emulated_decay(W.ema(8, 0.7)), 1 - 0.7 ** (8 - np.arange(1, 8)), atol=1e-15)


# -------------------------------------------------------------------------------------- post-hoc EMA


def _profile(T, g):
    """p_{T,γ}(t) = (γ+1) t^γ / T^{γ+1} on [0, T], 0 after."""
    return lambda t: np.where(t <= T, (g + 1) * np.clip(t, 0, None) ** g / T ** (g + 1), 0.0)


def test_sigma_rel_and_gamma_match_edm2_and_the_profile_std():
    # EDM2 §3: σ_rel = 0.05 ↔ γ = 16.97, σ_rel = 0.10 ↔ γ = 6.94
    assert W.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert W.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for g in (0.0, 0.5, 3.0, 16.97, 60.0):
        dens = _profile(1.0, g)
        mean = _quad(lambda t, dens=dens: t * dens(t), 0, 1)
        std = math.sqrt(_quad(lambda t, dens=dens, mean=mean: (t - mean) ** 2 * dens(t), 0, 1))
        assert W.gamma_to_sigma_rel(g) == pytest.approx(std, rel=1e-6)
        assert W.sigma_rel_to_gamma(W.gamma_to_sigma_rel(g)) == pytest.approx(g, abs=1e-8)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        W.sigma_rel_to_gamma(0.3)
    with pytest.raises(ValueError, match="sigma_rel must be > 0"):
        W.sigma_rel_to_gamma(0.0)


@pytest.mark.parametrize(
    "ta,ga,tb,gb", [(400, 6.94, 1000, 16.97), (1000, 6.94, 400, 16.97), (700, 2, 700, 0)]
)
def test_profile_dot_is_the_integral_of_the_product(ta, ga, tb, gb):
    pa, pb = _profile(ta, ga), _profile(tb, gb)
    want = _quad(lambda t: pa(t) * pb(t), 0, min(ta, tb))
    assert W.profile_dot(ta, ga, tb, gb) == pytest.approx(want, rel=1e-6)


def _snapshots():
    steps = [250, 500, 750, 1000] * 2
    gammas = [16.97] * 4 + [6.94] * 4  # ema-pytorch's PostHocEMA with sigma_rels (0.05, 0.10)
    return steps, gammas


def test_posthoc_fit_matches_algorithm_3_by_quadrature():
    # ema-pytorch's solve_weights: A w = b with A, b the profile inner products; here A and b come from
    # numerical integration and numpy's solver, and the residual from integrating the fitted profile
    steps, gammas = _snapshots()
    prof = [_profile(t, g) for t, g in zip(steps, gammas, strict=True)]
    target = _profile(1000, 10.0)
    A = np.array([[_quad(lambda t, p=p, q=q: p(t) * q(t), 0, 1000) for q in prof] for p in prof])
    b = np.array([_quad(lambda t, p=p: p(t) * target(t), 0, 1000) for p in prof])
    want = np.linalg.solve(A, b)
    fit = W.posthoc_ema(steps, gammas, gamma=10.0, affine=False)
    np.testing.assert_allclose(fit.weights, want, rtol=1e-4, atol=1e-5)
    fitted = lambda t: sum(w * p(t) for w, p in zip(fit.weights, prof, strict=True))  # noqa: E731
    err = math.sqrt(_quad(lambda t: (fitted(t) - target(t)) ** 2, 0, 1000))
    assert fit.residual == pytest.approx(err / math.sqrt(_quad(lambda t: target(t) ** 2, 0, 1000)), rel=1e-3)
    assert 1e-4 < fit.residual < 0.05 and fit.sigma_rel == pytest.approx(W.gamma_to_sigma_rel(10.0))

    aff = W.posthoc_ema(steps, gammas, gamma=10.0)  # the default adds Σw = 1 and barely moves the fit
    assert abs(aff.weights.sum() - 1) < 1e-12 and abs(fit.weights.sum() - 1) > 1e-6
    assert fit.residual <= aff.residual < fit.residual * 1.05


def test_a_stored_target_is_that_snapshot_alone_and_far_targets_fit_worse():
    steps, gammas = _snapshots()
    for affine in (False, True):
        fit = W.posthoc_ema(steps, gammas, gamma=6.94, affine=affine)
        one = np.zeros(8)
        one[7] = 1.0
        np.testing.assert_allclose(fit.weights, one, atol=1e-8)
        assert fit.residual < 1e-6
    res = [W.posthoc_ema(steps, gammas, gamma=g).residual for g in (10.0, 3.0, 1.0, 0.2)]
    assert res == sorted(res) and res[-1] > 0.3, res
    assert W.posthoc_ema(steps, gammas, gamma=60.0).residual > 5 * res[0]


def _karras(traj, gamma):
    """The power EMA run step by step: m_1 = θ_1, β_t = (1 − 1/t)^{γ+1} (EDM2 eq. 4); all m_t."""
    m, out = traj[0].copy(), [traj[0].copy()]
    for t in range(2, len(traj) + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        m = beta * m + (1 - beta) * traj[t - 1]
        out.append(m.copy())
    return np.array(out)


def test_the_fitted_merge_reproduces_the_target_ema_on_a_real_trajectory():
    rng = np.random.default_rng(0)
    T, p = 2000, 40
    traj = np.cumsum(rng.normal(size=(T, p)), axis=0) + np.outer(np.arange(T), rng.normal(size=p)) * 0.05
    steps = [400, 800, 1200, 1600, 2000]
    emas = {g: _karras(traj, g) for g in (16.97, 6.94)}
    snaps = np.array([emas[g][t - 1] for g in emas for t in steps])
    target = _karras(traj, 10.0)[-1]
    fit = W.posthoc_ema(steps * 2, [g for g in emas for _ in steps], gamma=10.0)
    got = W.apply(fit.weights, snaps)
    nearest = snaps[np.argmin([np.linalg.norm(s - target) for s in snaps])]
    assert np.linalg.norm(got - target) < 0.25 * np.linalg.norm(nearest - target)


def test_raw_checkpoints_stand_for_their_cells():
    steps = np.arange(100, 1001, 100)
    g = W.sigma_rel_to_gamma(0.2)
    fit = W.posthoc_ema(steps, sigma_rel=0.2, affine=False)
    edges = [50, *(steps[:-1] + 50), 1000]  # midpoint cells, the first as wide on the left
    mass = [_quad(_profile(1000, g), lo, hi, 20_001) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    np.testing.assert_allclose(fit.weights, mass, rtol=1e-6, atol=1e-9)
    aff = W.posthoc_ema(steps, sigma_rel=0.2)
    assert abs(aff.weights.sum() - 1) < 1e-12 and np.all(aff.weights >= 0)
    # resolution: a wide target over dense checkpoints fits; a narrow one over sparse checkpoints does not
    dense = W.posthoc_ema(np.arange(10, 1001, 10), sigma_rel=0.05).residual
    sparse = W.posthoc_ema(steps, sigma_rel=0.05).residual
    assert fit.residual < 0.1 and dense < 0.06 and sparse > 0.25, (fit.residual, dense, sparse)

    # on a smooth trajectory the raw merge lands near the EMA run step by step
    rng = np.random.default_rng(1)
    t = np.arange(1, 1001)[:, None] / 1000
    traj = np.sin(3 * t * rng.normal(size=(1, 20))) + 0.01 * rng.normal(size=(1000, 20))
    target = _karras(traj, g)[-1]
    got = W.apply(aff.weights, traj[steps - 1])
    assert np.linalg.norm(got - target) < 0.1 * np.linalg.norm(traj[-1] - target)


def test_posthoc_arguments_are_checked():
    steps, gammas = _snapshots()
    with pytest.raises(ValueError, match="exactly one of gamma and sigma_rel"):
        W.posthoc_ema(steps, gammas)
    with pytest.raises(ValueError, match="exactly one of gamma and sigma_rel"):
        W.posthoc_ema(steps, gammas, gamma=1.0, sigma_rel=0.1)
    with pytest.raises(ValueError, match="gammas must have one entry per snapshot"):
        W.posthoc_ema(steps, gammas[:3], gamma=1.0)
    with pytest.raises(ValueError, match="gammas must be >= 0"):
        W.posthoc_ema(steps, [-1.0] * 8, gamma=1.0)
    with pytest.raises(ValueError, match="steps must be > 0"):
        W.posthoc_ema([0, 10], gamma=1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        W.posthoc_ema([10, 10, 20], gamma=1.0)
    with pytest.raises(ValueError, match="newest step"):
        W.posthoc_ema([10, 20], gamma=1.0, step=15)
    with pytest.raises(ValueError, match="past the newest snapshot"):
        W.posthoc_ema(steps, gammas, gamma=1.0, step=2000)
    assert W.posthoc_ema(steps, gammas, gamma=6.94, step=750).residual < 1e-3  # an earlier read-out
