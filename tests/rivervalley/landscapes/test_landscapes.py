import numpy as np
import pytest
import torch

from rivervalley.landscapes import (
    HyperbolaRiver,
    MatrixLeastSquares,
    QuadraticRiverValley,
    SineRiver,
    flat_then_steep,
)

F64 = torch.float64


def _landscapes():
    return [
        QuadraticRiverValley(slope=1.5, curvatures=[0.5, 2.0, 3.0]),
        QuadraticRiverValley(slope=0.7, river_curvature=0.2, power_law=(4.0, 1.0), m=5, rotate=True, seed=3),
        SineRiver(slope=1.0, valley_curvature=10.0, amplitude=0.8, length=1.3),
        HyperbolaRiver(slope=0.5, valley_curvature=2.0),
        MatrixLeastSquares(a=3, b=4, slope=0.3, seed=1),
        MatrixLeastSquares(a=4, b=2, input_cov_spectrum=[0.0, 1.0], target="zero"),
    ]


def _hessian(landscape, theta):
    return torch.autograd.functional.hessian(lambda x: landscape.loss(x), theta)


@pytest.mark.parametrize("landscape", _landscapes(), ids=lambda x: type(x).__name__)
def test_protocol_shapes_and_grad_matches_autograd(landscape):
    p = landscape.dim
    theta = torch.randn(3, p, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = theta.clone().requires_grad_(True)
    landscape.loss(x).sum().backward()
    torch.testing.assert_close(landscape.grad(theta), x.grad, rtol=1e-12, atol=1e-12)
    assert landscape.loss(theta).shape == (3,)
    assert landscape.river_coordinate(theta).shape == (3,)
    assert landscape.valley_coordinates(theta).shape[0] == 3
    assert landscape.loss(theta[0]).shape == ()  # a 1-D theta is a single seed
    d = landscape.river_direction(theta)
    assert d.shape in {(p,), (3, p)}
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(d.shape[:-1], dtype=F64))
    info = landscape.describe()
    assert info["dim"] == p and "river" in info
    out = torch.empty_like(theta)
    torch.testing.assert_close(landscape.grad_into(theta, out), landscape.grad(theta))
    f32 = landscape.to(dtype=torch.float32)
    assert f32.loss(theta.float()).dtype == torch.float32 and landscape.dtype == F64


def test_quadratic_formula_coordinates_and_round_trip():
    lam = [0.5, 2.0, 3.0]
    for rotate in (False, True):
        q = QuadraticRiverValley(slope=1.5, river_curvature=0.25, curvatures=lam, rotate=rotate, seed=5)
        u = torch.tensor([0.3, -1.0], dtype=F64)
        v = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.5, 0.25]], dtype=F64)
        theta = q.to_param(u, v)
        torch.testing.assert_close(q.river_coordinate(theta), u)
        torch.testing.assert_close(q.valley_coordinates(theta), v)
        expect = -1.5 * u + 0.125 * u**2 + 0.5 * (v**2 * torch.tensor(lam, dtype=F64)).sum(1)
        torch.testing.assert_close(q.loss(theta), expect)
        torch.testing.assert_close(q.from_eigen(q.to_eigen(theta)), theta)
        assert q.river_optimum == pytest.approx(6.0)
    assert QuadraticRiverValley().river_optimum is None


@pytest.mark.parametrize(
    "landscape",
    [_landscapes()[1], _landscapes()[4], _landscapes()[5]],
    ids=["rotated", "matrix", "matrix-linear"],
)
def test_hessian_eigen_and_river_direction(landscape):
    theta = torch.zeros(landscape.dim, dtype=F64)
    hess = _hessian(landscape, theta)
    np.testing.assert_allclose(
        np.sort(torch.linalg.eigvalsh(hess).numpy()), np.sort(landscape.hessian_eigen()), atol=1e-12
    )
    r = landscape.river_direction()
    torch.testing.assert_close(hess @ r, landscape.river_curvature * r, atol=1e-12, rtol=0)
    # the slope acts along the river only: the gradient at the valley floor's origin is −c·r
    z0 = torch.zeros(1, landscape.dim, dtype=F64)
    torch.testing.assert_close(landscape.grad(landscape.from_eigen(z0))[0], -landscape.slope * r)


def test_power_law_and_flat_then_steep():
    q = QuadraticRiverValley(m=4, power_law=(2.0, 1.5))
    np.testing.assert_allclose(q.curvatures, 2.0 * np.arange(1, 5) ** -1.5)
    np.testing.assert_allclose(q.hessian_eigen(), np.r_[0.0, q.curvatures])
    s = flat_then_steep(16)
    assert (s == 0.01).sum() == 2 and (s == 1.0).sum() == 14
    m = MatrixLeastSquares(a=2, b=16)
    assert m.shape == (2, 16) and m.dim == 32 and m.river_curvature == pytest.approx(0.01)
    assert m.river_optimum == pytest.approx(100.0)
    assert float(m.loss(m.target.reshape(-1))) == pytest.approx(0.0, abs=1e-14)


def test_noise_std_laws():
    q = QuadraticRiverValley(curvatures=[1.0, 4.0])
    np.testing.assert_allclose(q.noise_std(2.0), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(q.noise_std(2.0, 0.5, "minibatch"), [0.5, 2.0, 4.0])
    np.testing.assert_allclose(q.stationary_variance(0.1, 1.0)[1:], [0.1 / 1.9, 0.1 / (4 * 1.6)])


@pytest.mark.parametrize("river", [SineRiver(), HyperbolaRiver()], ids=["sine", "hyperbola"])
def test_curved_river_floor(river):
    u = torch.linspace(-2.0, 2.0, 9, dtype=F64)
    pts = river.floor(u)
    torch.testing.assert_close(river.river_coordinate(pts), u)
    torch.testing.assert_close(
        river.valley_coordinates(pts)[:, 0], torch.zeros(9, dtype=F64), atol=1e-14, rtol=0
    )
    # moving along the floor lowers the loss at rate c per unit of u
    torch.testing.assert_close(river.loss(pts), -river.slope * u)
    # the tangent points along the floor: a small step along it stays on the floor to second order
    t = river.river_direction(pts)
    eps = 1e-4
    off = river.valley_coordinates(pts + eps * t)[:, 0].abs()
    assert off.max() < 50 * eps**2


def test_hyperbola_gradient_is_tangent_on_the_floor():
    river = HyperbolaRiver(slope=1.3, valley_curvature=5.0)
    pts = river.floor(torch.linspace(-3, 3, 7, dtype=F64))
    g = river.grad(pts)
    t = river.river_direction(pts)
    normal = g - (g * t).sum(1, keepdim=True) * t
    assert normal.abs().max() < 1e-12
    assert ((g * t).sum(1) < 0).all()  # descending along the river


@pytest.mark.parametrize(
    "river,u0,du",
    [
        (SineRiver(amplitude=1.0, length=1.0, valley_curvature=10.0), 0.0, 0.2),
        (HyperbolaRiver(valley_curvature=2.0), 0.0, 0.3),
    ],
    ids=["sine", "hyperbola"],
)
def test_secant_extrapolation_helps_short_and_fails_far(river, u0, du):
    """E(α) = P1 + α(P1 − P0) for floor points P0, P1: a short extrapolation gains river progress at a
    tiny valley cost (loss below P1's); a long one leaves the bending floor and the loss blows up."""
    p0, p1 = river.floor(torch.tensor([u0, u0 + du], dtype=F64))
    loss1 = float(river.loss(p1))
    near = p1 + 1.0 * (p1 - p0)
    far = p1 + 15.0 * (p1 - p0)
    assert float(river.loss(near)) < loss1
    assert abs(float(river.valley_coordinates(near)[0])) < 0.05
    assert abs(float(river.valley_coordinates(far)[0])) > 1.0
    assert float(river.loss(far)) > loss1


@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: QuadraticRiverValley(curvatures=[1.0, -0.5]), "curvatures"),
        (lambda: QuadraticRiverValley(curvatures=[1.0, float("nan")]), "curvatures"),
        (lambda: QuadraticRiverValley(river_curvature=-1.0), "river_curvature"),
        (lambda: QuadraticRiverValley(slope=float("inf")), "slope"),
        (lambda: QuadraticRiverValley(curvatures=[1.0], m=2), "m"),
        (lambda: QuadraticRiverValley(m=-1), "m"),
        (lambda: MatrixLeastSquares(a=2, b=3, input_cov_spectrum=[1.0, 1.0]), "input_cov_spectrum"),
        (lambda: MatrixLeastSquares(a=0, b=3), "a"),
        (lambda: MatrixLeastSquares(a=2, b=3, target="ones"), "target"),
        (lambda: SineRiver(length=0.0), "length"),
        (lambda: HyperbolaRiver(valley_curvature=-1.0), "valley_curvature"),
        (lambda: QuadraticRiverValley(curvatures=[4.0]).stationary_variance(0.5, 1.0), "lr"),
        (lambda: QuadraticRiverValley().noise_std(1.0, kind="pink"), "noise_kind"),
        (lambda: QuadraticRiverValley(m=2).loss(torch.zeros(2, 2)), "theta"),
    ],
)
def test_bad_arguments_name_the_parameter(build, name):
    with pytest.raises(ValueError, match=name):
        build()
