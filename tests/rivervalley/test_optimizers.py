"""The batched functional optimizers against torch.optim, step for step."""

import pytest
import torch
import torch.optim._muon as torch_muon

from rivervalley.optimizers import SGD, Adam, Muon, get_optimizer, muon_lr_ratio, zeropower_via_newtonschulz

STEPS = 20
LRS = [0.05 * (1 + 0.5 * ((t * 7) % 5) / 5) for t in range(STEPS)]  # a varying lr exercises per-step lr


def _grad_fn(p, seed=0):
    """A fixed quadratic plus a fixed per-step perturbation, identical for both implementations."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    kicks = torch.randn(STEPS, p, generator=gen, dtype=torch.float64)
    return lambda theta, t: theta @ hess + kicks[t]


def _run_torch(make_opt, theta0, grad_fn):
    param = torch.nn.Parameter(theta0.clone())
    opt = make_opt([param])
    for t in range(STEPS):
        param.grad = grad_fn(param.detach(), t)
        for group in opt.param_groups:
            group["lr"] = LRS[t]
        opt.step()
    return param.detach()


def _run_ours(opt, theta0, grad_fn):
    theta = theta0.clone()
    state = opt.init(theta)
    for t in range(STEPS):
        grad = grad_fn(theta, t)
        grad_copy = grad.clone()
        theta = opt.step(theta, grad, LRS[t], state)
        assert torch.equal(grad, grad_copy), "step must not modify grad"
    return theta


SGD_CONFIGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.9, "weight_decay": 0.05},
    {"weight_decay": 0.1},
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sgd_matches_torch(cfg):
    p = 7
    grad_fn = _grad_fn(p)
    theta0 = torch.randn(1, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False, **cfg), theta0, grad_fn)
    ours = _run_ours(SGD(**cfg), theta0, grad_fn)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


ADAM_CONFIGS = [
    ("Adam", {}, {}),
    ("Adam", {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled": False}),
    ("AdamW", {"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ("AdamW", {"weight_decay": 0.0, "betas": (0.8, 0.95), "eps": 1e-6}, {"betas": (0.8, 0.95), "eps": 1e-6}),
]


@pytest.mark.parametrize("name,torch_cfg,our_cfg", ADAM_CONFIGS)
def test_adam_matches_torch(name, torch_cfg, our_cfg):
    p = 6
    grad_fn = _grad_fn(p, seed=2)
    theta0 = torch.randn(1, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cls = getattr(torch.optim, name)
    ref = _run_torch(lambda ps: cls(ps, lr=0.1, foreach=False, **torch_cfg), theta0, grad_fn)
    ours = _run_ours(Adam(**our_cfg), theta0, grad_fn)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_batched_seeds_are_independent_runs():
    """S seeds in one batch equal S separate single-seed runs (no cross-talk between rows)."""
    p, s = 5, 4
    grad_fn = _grad_fn(p, seed=4)
    theta0 = torch.randn(s, p, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for opt in (SGD(momentum=0.9, nesterov=True), Adam(weight_decay=0.01)):
        batched = _run_ours(opt, theta0, grad_fn)
        for i in range(s):
            single = _run_ours(opt, theta0[i : i + 1], grad_fn)
            torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-12)


# ---- Muon ----


def _muon_grad_fn(a, b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(a, b, generator=gen, dtype=torch.float64)
    scale = torch.linspace(0.05, 2.0, b, dtype=torch.float64)  # anisotropic input covariance
    kicks = 0.1 * torch.randn(STEPS, a, b, generator=gen, dtype=torch.float64)
    return lambda w, t: ((w.reshape(-1, a, b) - target) * scale + kicks[t]).reshape(w.shape)


MUON_CASES = [
    ((6, 4), {}),  # tall: transposed inside NS, lr ratio sqrt(a/b)
    ((4, 6), {"nesterov": False}),
    ((5, 5), {"weight_decay": 0.0, "momentum": 0.9}),
    ((8, 3), {"adjust_lr_fn": "match_rms_adamw"}),
    ((3, 8), {"adjust_lr_fn": "original", "ns_steps": 3}),
]


@pytest.mark.parametrize("shape,cfg", MUON_CASES)
def test_muon_bf16_matches_torch_muon(shape, cfg):
    """ns_dtype=bfloat16 runs torch.optim.Muon's exact arithmetic: same result on a single seed."""
    a, b = shape
    grad_fn = _muon_grad_fn(a, b)
    w0 = torch.randn(a, b, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = _run_torch(lambda ps: torch.optim.Muon(ps, lr=0.02, **cfg), w0, grad_fn)
    ours = _run_ours(Muon(shape, ns_dtype=torch.bfloat16, **cfg), w0.reshape(1, -1), grad_fn)
    torch.testing.assert_close(ours.reshape(a, b), ref, rtol=0, atol=1e-6)


def _ns_in_float64(grad, ns_coefficients, ns_steps, eps):
    """torch's _zeropower_via_newtonschulz verbatim, except that it keeps the input dtype (no bfloat16)."""
    a, b, c = ns_coefficients
    ortho = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        upd = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, upd, ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho


@pytest.mark.parametrize("shape,cfg", MUON_CASES[:4])
def test_muon_float64_matches_torch_muon_with_float64_ns(shape, cfg, monkeypatch):
    """Default ns_dtype=None: torch.optim.Muon's momentum, lr scaling and weight decay, with the
    Newton–Schulz step kept in float64 on both sides; S = 3 seeds against 3 separate torch runs."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _ns_in_float64)
    a, b = shape
    grad_fn = _muon_grad_fn(a, b, seed=1)
    w0 = torch.randn(3, a * b, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ours = _run_ours(Muon(shape, **cfg), w0, grad_fn)
    for i in range(3):
        ref = _run_torch(lambda ps: torch.optim.Muon(ps, lr=0.02, **cfg), w0[i].reshape(a, b), grad_fn)
        torch.testing.assert_close(ours[i].reshape(a, b), ref, rtol=0, atol=1e-10)


def test_newton_schulz_batched_equals_per_matrix_and_orthogonalises():
    g = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = zeropower_via_newtonschulz(g, dtype=None)
    for i in range(5):
        torch.testing.assert_close(out[i], _ns_in_float64(g[i], (3.4445, -4.775, 2.0315), 5, 1e-7))
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.5 and sv.max() < 1.3  # the quintic's S' ~ U(0.5, 1.5) band, not exactly 1
    assert torch.equal(
        g, torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    )
    assert muon_lr_ratio((8, 2)) == 2.0 and muon_lr_ratio((2, 8)) == 1.0
    assert muon_lr_ratio((4, 16), "match_rms_adamw") == pytest.approx(0.8)


@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: SGD(momentum=-0.1), "momentum"),
        (lambda: SGD(momentum=1.0), "momentum"),
        (lambda: SGD(nesterov=True), "nesterov"),
        (lambda: SGD(weight_decay=float("nan")), "weight_decay"),
        (lambda: Adam(betas=(1.0, 0.9)), "betas"),
        (lambda: Adam(eps=-1.0), "eps"),
        (lambda: Muon((0, 3)), "shape"),
        (lambda: Muon((3, 3), adjust_lr_fn="bogus"), "adjust_lr_fn"),
        (lambda: Muon((3, 3), ns_steps=0), "ns_steps"),
        (lambda: get_optimizer("lion"), "name"),
    ],
)
def test_bad_arguments_name_the_parameter(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_step_rejects_bad_lr_and_shape():
    theta = torch.zeros(2, 6, dtype=torch.float64)
    opt = SGD()
    with pytest.raises(ValueError, match="lr"):
        opt.step(theta, theta.clone(), float("nan"), opt.init(theta))
    muon = Muon((2, 2))
    with pytest.raises(ValueError, match="shape"):
        muon.init(theta)


def test_get_optimizer():
    assert isinstance(get_optimizer("sgd", momentum=0.9), SGD)
    assert get_optimizer("adam").decoupled is False and get_optimizer("adamw").decoupled is True
    assert get_optimizer("muon", shape=(2, 3)).shape == (2, 3)
