"""Bending rivers in 2-D: :class:`SineRiver` and :class:`HyperbolaRiver`, whose floor curves so that
straight-line extrapolation along a secant eventually leaves it.
"""

from __future__ import annotations

import math

import torch

from rivervalley.landscapes.base import Landscape, batched, check_noise, finite, positive

__all__ = ["SineRiver", "HyperbolaRiver"]


class _CurvedRiver2D(Landscape):
    """L = −c·u(θ) + (λ/2)·v(θ)² for scalar fields u (progress) and v (signed distance-like offset from the
    floor v = 0). The river tangent at θ is the unit vector ⟂ ∇v oriented along ∇u."""

    dim = 2

    def __init__(self, slope: float, valley_curvature: float, dtype, device):
        self.slope = finite("slope", slope)
        self.valley_curvature = positive("valley_curvature", valley_curvature)
        self.dtype, self.device = dtype, torch.device(device)

    # subclasses: _u, _v, _grad_u, _grad_v (all on [S, 2]), floor(u)

    @batched
    def loss(self, theta):
        v = self._v(theta)
        return -self.slope * self._u(theta) + 0.5 * self.valley_curvature * v * v

    @batched
    def grad(self, theta):
        """∇L = −c ∇u + λ v ∇v."""
        return -self.slope * self._grad_u(theta) + (self.valley_curvature * self._v(theta))[
            :, None
        ] * self._grad_v(theta)

    @batched
    def river_coordinate(self, theta):
        return self._u(theta)

    @batched
    def valley_coordinates(self, theta):
        return self._v(theta)[:, None]

    def _frame(self, theta):
        """(t, n, |∇v|): unit river tangent, unit valley normal and the norm of ∇v at θ."""
        gv = self._grad_v(theta)
        norm = gv.norm(dim=1, keepdim=True)
        n = gv / norm
        t = torch.stack([n[:, 1], -n[:, 0]], dim=1)
        sign = torch.sign((t * self._grad_u(theta)).sum(dim=1, keepdim=True))
        t = t * torch.where(sign == 0, torch.ones_like(sign), sign)
        return t, n, norm

    def river_direction(self, theta=None):
        """Unit tangent of the level set of v through θ (parallel to the floor on the floor), ``[S, 2]``;
        with ``theta=None``, at the floor point u = 0."""
        if theta is None:
            return self._frame(self.floor(torch.zeros(1, dtype=self.dtype)))[0][0]
        theta = torch.as_tensor(theta)
        if theta.ndim == 1:
            return self._frame(theta[None])[0][0]
        return self._frame(theta)[0]

    def valley_curvature_at(self, theta) -> torch.Tensor:
        """Curvature of L across the floor at θ (on the floor): λ |∇v|²."""
        theta = torch.as_tensor(theta)
        theta2 = theta[None] if theta.ndim == 1 else theta
        out = self.valley_curvature * (self._grad_v(theta2) ** 2).sum(dim=1)
        return out[0] if theta.ndim == 1 else out

    def make_noise(self, sigma, river_sigma, kind):
        """Additive: σ ξ with its component along the local river tangent t rescaled to σ_u.
        Minibatch: σ_u (t·ξ) t + σ √(λ|∇v|²) (n·ξ) n (std ∝ √(local valley curvature))."""
        sigma, river_sigma = check_noise(sigma, river_sigma, kind)
        if sigma == 0 and river_sigma == 0:
            return None

        def noise(g, xi, theta):
            xi = xi.to(self.dtype)
            t, n, norm = self._frame(theta)
            xt = (xi * t).sum(dim=1, keepdim=True)
            if kind == "additive":
                return g.add_(xi, alpha=sigma).add_(t * (xt * (river_sigma - sigma)))
            xn = (xi * n).sum(dim=1, keepdim=True)
            scale = sigma * math.sqrt(self.valley_curvature) * norm
            return g.add_(t * (river_sigma * xt)).add_(n * (scale * xn))

        return noise


class SineRiver(_CurvedRiver2D):
    """A river that winds: floor y = a·sin(x/ℓ), progress u = x, valley offset v = y − a·sin(x/ℓ).

        L(x, y) = −c·x + (λ/2)·(y − a·sin(x/ℓ))²

    The floor is the curve {(x, a sin(x/ℓ))}. Because ∇u = e_x is not tangent to the floor where it slopes,
    noise-free gradient flow runs slightly off the floor there (offset ≈ c·(a/ℓ)cos(x/ℓ)/(λ(1+(a/ℓ)²cos²))).
    A straight line through two floor points leaves the floor by up to 2a once extrapolated across a bend.
    """

    def __init__(
        self,
        *,
        slope: float = 1.0,
        valley_curvature: float = 10.0,
        amplitude: float = 1.0,
        length: float = 1.0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        super().__init__(slope, valley_curvature, dtype, device)
        self.amplitude = finite("amplitude", amplitude)
        self.length = positive("length", length)

    def _u(self, th):
        return th[:, 0]

    def _v(self, th):
        return th[:, 1] - self.amplitude * torch.sin(th[:, 0] / self.length)

    def _grad_u(self, th):
        g = torch.zeros_like(th)
        g[:, 0] = 1.0
        return g

    def _grad_v(self, th):
        g = torch.ones_like(th)
        g[:, 0] = -(self.amplitude / self.length) * torch.cos(th[:, 0] / self.length)
        return g

    def floor(self, u) -> torch.Tensor:
        """Floor points at river coordinates ``u`` ([n] -> [n, 2])."""
        u = torch.as_tensor(u, dtype=self.dtype, device=self.device).reshape(-1)
        return torch.stack([u, self.amplitude * torch.sin(u / self.length)], dim=1)

    def describe(self) -> dict:
        return {
            "name": "SineRiver",
            "formula": "L = -c*x + (lam/2)*(y - a*sin(x/l))^2",
            "dim": 2,
            "slope": self.slope,
            "valley_curvature": self.valley_curvature,
            "amplitude": self.amplitude,
            "length": self.length,
            "river": "the curve y = a*sin(x/l); river coordinate u = x, valley coordinate v = y - a*sin(x/l)",
        }


class HyperbolaRiver(_CurvedRiver2D):
    """A river along the hyperbola w1·w2 = 1, in conformal coordinates of z² (z = w1 + i·w2):

        u = (w1² − w2²)/2,   v = w1·w2 − 1,   L = −c·u + (λ/2)·v²

    ∇u = (w1, −w2) ⟂ ∇v = (w2, w1) everywhere, so on the floor the gradient is exactly tangent to it and the
    noise-free flow stays on the floor (the map z ↦ z²/2 straightens this river into QuadraticRiverValley's).
    The floor has two branches (w1, w2 > 0 and w1, w2 < 0); ``floor(u)`` returns the positive one. The
    valley steepens away from the vertex (curvature λ(w1² + w2²)) and the river slope grows like |θ|. Any
    secant of the convex branch lies off the floor; extrapolated far enough it crosses the axes.
    """

    def __init__(
        self,
        *,
        slope: float = 1.0,
        valley_curvature: float = 1.0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        super().__init__(slope, valley_curvature, dtype, device)

    def _u(self, th):
        return 0.5 * (th[:, 0] ** 2 - th[:, 1] ** 2)

    def _v(self, th):
        return th[:, 0] * th[:, 1] - 1.0

    def _grad_u(self, th):
        return torch.stack([th[:, 0], -th[:, 1]], dim=1)

    def _grad_v(self, th):
        return torch.stack([th[:, 1], th[:, 0]], dim=1)

    def floor(self, u) -> torch.Tensor:
        """Points (w1, 1/w1) on the positive branch with (w1² − w2²)/2 = u ([n] -> [n, 2])."""
        u = torch.as_tensor(u, dtype=self.dtype, device=self.device).reshape(-1)
        w1 = torch.sqrt(u + torch.sqrt(u * u + 1.0))
        return torch.stack([w1, 1.0 / w1], dim=1)

    def describe(self) -> dict:
        return {
            "name": "HyperbolaRiver",
            "formula": "L = -c*(w1^2 - w2^2)/2 + (lam/2)*(w1*w2 - 1)^2",
            "dim": 2,
            "slope": self.slope,
            "valley_curvature": self.valley_curvature,
            "river": "the hyperbola w1*w2 = 1 (positive branch used by floor()); u = (w1^2 - w2^2)/2, "
            "v = w1*w2 - 1",
        }
