"""River-valley loss landscapes, batched over seeds (THEORY.md, "The toy model").

Every landscape works on a batch ``theta`` of shape ``[S, p]`` (S seeds, p = ``dim`` parameters; a 1-D
``[p]`` input is treated as S = 1 and the leading axis is dropped from the output) and shares one protocol:

- ``loss(theta) -> [S]``, ``grad(theta) -> [S, p]``;
- ``river_coordinate(theta) -> [S]`` (u, progress along the river), ``valley_coordinates(theta) -> [S, m]``
  (v, distance from the river floor in each hill direction);
- ``river_direction(theta=None)``: the unit tangent of the river, ``[p]`` when it is constant, ``[S, p]`` at
  the points ``theta`` when it bends;
- ``describe() -> dict``: the formula and where the river is.

Three families:

- :class:`QuadraticRiverValley`: L = −c·u + (μ/2)u² + ½ Σ_i λ_i v_i², optionally rotated by a fixed random
  orthogonal Q so the river is not a coordinate axis;
- :class:`SineRiver` and :class:`HyperbolaRiver`: 2-D rivers whose floor bends, so that straight-line
  extrapolation along a secant eventually leaves the floor;
- :class:`MatrixLeastSquares`: L(W) = ½ tr((W − W*) Σ (W − W*)ᵀ) − c⟨R, W − W*⟩ on a matrix W (for Muon).

The quadratic ones (:class:`QuadraticRiverValley`, :class:`MatrixLeastSquares`) share an eigenbasis
(``to_eigen`` / ``from_eigen``, ``hessian_eigen()``) in which coordinate 0 is the river and 1..p−1 the
valley; the simulator's exact fast path and stationary initialisation work in that basis.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "Landscape",
    "QuadraticRiverValley",
    "SineRiver",
    "HyperbolaRiver",
    "MatrixLeastSquares",
    "flat_then_steep",
]

NOISE_KINDS = ("additive", "minibatch")


# --------------------------------------------------------------------------------------------------
# helpers


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _nonneg(name: str, value: float) -> float:
    value = _finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _positive(name: str, value: float) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _random_orthogonal(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Haar-distributed orthogonal n×n matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).to(dtype)


def _batched(fn):
    """Let a method accept ``[p]`` as well as ``[S, p]``; a 1-D input gets a 1-D-less output."""

    def wrapper(self, theta, *args, **kw):
        theta = torch.as_tensor(theta)
        if theta.ndim == 1:
            return fn(self, theta.unsqueeze(0), *args, **kw)[0]
        if theta.ndim != 2 or theta.shape[1] != self.dim:
            raise ValueError(
                f"theta must have shape [S, {self.dim}] or [{self.dim}], got {tuple(theta.shape)}"
            )
        return fn(self, theta, *args, **kw)

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


def _check_noise(sigma: float, river_sigma: float | None, kind: str) -> tuple[float, float]:
    sigma = _nonneg("noise", sigma)
    river_sigma = sigma if river_sigma is None else _nonneg("river_noise", river_sigma)
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {kind!r}")
    return sigma, river_sigma


def flat_then_steep(
    b: int, *, n_flat: int | None = None, flat: float = 0.01, steep: float = 1.0
) -> np.ndarray:
    """Input-covariance spectrum with ``n_flat`` (default max(1, b // 8)) small eigenvalues ``flat`` and
    the remaining ``b − n_flat`` equal to ``steep``, sorted ascending."""
    if b < 1:
        raise ValueError(f"b must be >= 1, got {b}")
    n_flat = max(1, b // 8) if n_flat is None else int(n_flat)
    if not 0 <= n_flat <= b:
        raise ValueError(f"n_flat must be in [0, b={b}], got {n_flat}")
    return np.concatenate(
        [np.full(n_flat, _nonneg("flat", flat)), np.full(b - n_flat, _nonneg("steep", steep))]
    )


# --------------------------------------------------------------------------------------------------
# protocol


class Landscape:
    """Base class: the protocol shared by all landscapes (see the module docstring)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def loss(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def grad(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def river_coordinate(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def valley_coordinates(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def river_direction(self, theta: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Landscape:
        """A copy whose floating-point tensors live on ``device`` with ``dtype`` (self if unchanged)."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if device == self.device and dtype == self.dtype:
            return self
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                kw = {"dtype": dtype} if value.is_floating_point() else {}
                setattr(new, name, value.to(device=device, **kw))
        new.device, new.dtype = device, dtype
        return new

    # ---- simulator hooks (private) ----
    def _grad_into(self, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``grad(theta)`` into ``out`` (subclasses avoid temporaries)."""
        out.copy_(self.grad(theta))
        return out

    def _make_noise(self, sigma: float, river_sigma: float | None, kind: str):
        """Return ``add_noise(g, xi, theta) -> g``: add to the gradient ``g`` [S, p] (in place) the gradient
        noise made from the standard normals ``xi`` [S, p] (any float dtype, never modified); ``None`` when
        there is no noise."""
        raise NotImplementedError  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# quadratics with an eigenbasis


class _EigenQuadratic(Landscape):
    """L = −c·z_0 + ½ Σ_k h_k z_k² in eigen-coordinates z = to_eigen(θ); z_0 is the river (h_0 = μ),
    z_1.. the valley (h_k = λ_k)."""

    slope: float
    river_curvature: float
    _h: torch.Tensor  # [p] Hessian eigenvalues in eigen order (index 0 = river)

    # subclasses: to_eigen, from_eigen, _eigen_to_param_linear, grad, river_direction, describe

    @property
    def m(self) -> int:
        """Number of valley directions (p − 1)."""
        return self.dim - 1

    @property
    def curvatures(self) -> np.ndarray:
        """Valley curvatures λ_1..λ_m (numpy, eigen order)."""
        return self._h[1:].cpu().double().numpy()

    @property
    def river_optimum(self) -> float | None:
        """u* = c/μ for a curved river (μ > 0), None for a linear one."""
        return self.slope / self.river_curvature if self.river_curvature > 0 else None

    def hessian_eigen(self) -> np.ndarray:
        """Hessian eigenvalues in eigen order: ``[μ, λ_1, ..., λ_m]`` (numpy float64)."""
        return self._h.cpu().double().numpy().copy()

    @_batched
    def loss(self, theta):
        """L = −c·u + (μ/2)u² + ½ Σ_i λ_i v_i² (the river's optimum, if any, is not subtracted)."""
        z = self.to_eigen(theta)
        return 0.5 * (z * z) @ self._h - self.slope * z[:, 0]

    @_batched
    def river_coordinate(self, theta):
        """u = z_0."""
        return self.to_eigen(theta)[:, 0]

    @_batched
    def valley_coordinates(self, theta):
        """v = z_1..z_m (eigen order, same order as ``curvatures``)."""
        return self.to_eigen(theta)[:, 1:]

    def to_param(self, u, v) -> torch.Tensor:
        """θ from river coordinate ``u`` (scalar or [S]) and valley coordinates ``v`` ([m] or [S, m])."""
        v = torch.as_tensor(v, dtype=self.dtype, device=self.device)
        u = torch.as_tensor(u, dtype=self.dtype, device=self.device)
        squeeze = v.ndim == 1 and u.ndim == 0
        v = v.reshape(-1, self.m) if v.ndim <= 1 else v
        if v.shape[-1] != self.m:
            raise ValueError(f"v must have {self.m} valley coordinates, got shape {tuple(v.shape)}")
        u = u.reshape(-1).expand(v.shape[0]) if u.numel() == 1 else u.reshape(-1)
        if u.shape[0] != v.shape[0]:
            raise ValueError(f"u has {u.shape[0]} seeds but v has {v.shape[0]}")
        theta = self.from_eigen(torch.cat([u[:, None], v], dim=1))
        return theta[0] if squeeze else theta

    def noise_std(self, sigma: float, river_sigma: float | None = None, kind: str = "additive") -> np.ndarray:
        """Per-eigen-coordinate standard deviation of the gradient noise, ``[σ_u, σ_1, ..., σ_m]``.

        ``'additive'``: σ_i = σ for every valley coordinate. ``'minibatch'``: σ_i = σ·√λ_i (noise covariance
        σ²·H on the valley, as for minibatch gradients whose covariance tracks the Hessian). The river gets
        σ_u = ``river_sigma`` (default σ) in both cases.
        """
        sigma, river_sigma = _check_noise(sigma, river_sigma, kind)
        h = self.hessian_eigen()
        std = np.full(self.dim, sigma) if kind == "additive" else sigma * np.sqrt(h)
        std[0] = river_sigma
        return std

    def stationary_variance(
        self, lr: float, sigma: float, river_sigma: float | None = None, kind: str = "additive"
    ) -> np.ndarray:
        """THEORY §a: V_k = η σ_k² / (h_k (2 − η h_k)) per eigen-coordinate (inf where h_k = 0); requires
        0 < η h_k < 2 wherever h_k > 0."""
        lr = _positive("lr", lr)
        h = self.hessian_eigen()
        eh = lr * h
        bad = (h > 0) & ~((eh > 0) & (eh < 2))
        if bad.any():
            raise ValueError(
                f"lr*curvature must be in (0, 2) for stationarity; got lr*h up to {eh.max():.4g}"
            )
        std = self.noise_std(sigma, river_sigma, kind)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(h > 0, lr * std**2 / (h * (2 - eh)), np.inf)
        return v

    def _make_noise(self, sigma, river_sigma, kind):
        std = self.noise_std(sigma, river_sigma, kind)
        if not std.any():
            return None
        if np.all(std == std[0]):
            s = float(std[0])  # isotropic noise is invariant under the rotation: skip the basis change

            def iso(g, xi, theta):
                return g.add_(xi, alpha=s)

            return iso
        std_t = torch.as_tensor(std, dtype=self.dtype, device=self.device)

        def aniso(g, xi, theta):
            return g.add_(self._eigen_to_param_linear(xi.to(self.dtype) * std_t))

        return aniso


class QuadraticRiverValley(_EigenQuadratic):
    """L(u, v) = −c·u + (μ/2)·u² + ½ Σ_i λ_i v_i² on θ ∈ R^p, p = 1 + m (THEORY.md, "The toy model").

    Unrotated, θ = (u, v_1, ..., v_m): the river is the first coordinate axis and the valley floor is v = 0.
    With ``rotate=True`` θ = Q (u, v) for a fixed Haar-random orthogonal Q drawn from ``seed``: the river
    is the line {u·Q[:, 0]} and the floor is where Qᵀθ has zero valley part.

    Valley curvatures: ``curvatures`` (a list), else ``power_law=(lam_max, exponent)`` with
    λ_i = lam_max · i^(−exponent), i = 1..m, else ``m`` ones; default one valley direction with λ = 1.
    """

    def __init__(
        self,
        *,
        slope: float = 1.0,
        river_curvature: float = 0.0,
        curvatures: Sequence[float] | None = None,
        m: int | None = None,
        power_law: tuple[float, float] | None = None,
        rotate: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        self.slope = _finite("slope", slope)
        self.river_curvature = _nonneg("river_curvature", river_curvature)
        if curvatures is not None:
            lam = np.asarray(curvatures, dtype=np.float64).reshape(-1)
            if m is not None and m != lam.size:
                raise ValueError(f"m={m} disagrees with len(curvatures)={lam.size}")
        else:
            if m is None:
                m = 1
            if isinstance(m, bool) or int(m) != m or m < 0:
                raise ValueError(f"m must be an integer >= 0, got {m!r}")
            m = int(m)
            if power_law is not None:
                lam_max, exponent = (float(x) for x in power_law)
                _positive("power_law lam_max", lam_max)
                _finite("power_law exponent", exponent)
                lam = lam_max * np.arange(1, m + 1, dtype=np.float64) ** (-exponent)
            else:
                lam = np.ones(m)
        if not np.all(np.isfinite(lam)):
            raise ValueError("curvatures must be finite (got NaN or inf)")
        if np.any(lam <= 0):
            raise ValueError(f"curvatures must be > 0 (valley directions curve upwards), got min {lam.min()}")
        self.dim = 1 + lam.size
        self.dtype = dtype
        self.device = torch.device(device)
        self.rotate = bool(rotate)
        self.seed = int(seed)
        self._h = torch.tensor(np.concatenate([[self.river_curvature], lam]), dtype=dtype, device=self.device)
        if self.rotate:
            gen = torch.Generator().manual_seed(self.seed)
            self.Q = _random_orthogonal(self.dim, gen, dtype).to(self.device)  # columns: river, valley dirs
            self._A = (self.Q * self._h) @ self.Q.T  # Hessian in parameter coordinates
            self._g0 = -self.slope * self.Q[:, 0].clone()  # constant part of the gradient
        else:
            self.Q = None

    # ---- basis ----
    def to_eigen(self, theta: torch.Tensor) -> torch.Tensor:
        """z = Qᵀθ (= θ itself, not a copy, when unrotated)."""
        return theta @ self.Q if self.rotate else theta

    def from_eigen(self, z: torch.Tensor) -> torch.Tensor:
        """θ = Q z."""
        return self._eigen_to_param_linear(z.clone() if not self.rotate else z)

    def _eigen_to_param_linear(self, z):
        return z @ self.Q.T if self.rotate else z

    # ---- protocol ----
    @_batched
    def grad(self, theta):
        """∇L = H θ − c·q_0 with H = Q diag(μ, λ) Qᵀ and q_0 the river direction."""
        return self._grad_into(theta, torch.empty_like(theta))

    def _grad_into(self, theta, out):
        if self.rotate:
            torch.matmul(theta, self._A, out=out)
            out.add_(self._g0)
        else:
            torch.mul(theta, self._h, out=out)
            out[:, 0] -= self.slope
        return out

    def river_direction(self, theta=None):
        """Unit river tangent: e_0, or Q[:, 0] when rotated (constant; ``[S, p]`` if theta is given)."""
        if self.rotate:
            d = self.Q[:, 0].clone()
        else:
            d = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            d[0] = 1.0
        if theta is not None:
            theta = torch.as_tensor(theta)
            return d.expand(theta.shape[0], -1).clone() if theta.ndim == 2 else d
        return d

    def describe(self) -> dict:
        lam = self.curvatures
        return {
            "name": "QuadraticRiverValley",
            "formula": "L = -c*u + (mu/2)*u^2 + 1/2 * sum_i lam_i v_i^2,  theta = Q (u, v)",
            "dim": self.dim,
            "m": self.m,
            "slope": self.slope,
            "river_curvature": self.river_curvature,
            "river_optimum": self.river_optimum,
            "curvature_range": [float(lam.min()), float(lam.max())] if lam.size else None,
            "rotate": self.rotate,
            "seed": self.seed,
            "river": "the line theta = u * Q[:, 0] (Q = I unless rotate); valley floor: v = 0",
        }


class MatrixLeastSquares(_EigenQuadratic):
    """Matrix least squares with a river, for Muon: W ∈ R^{a×b}, flattened row-major to p = a·b.

        L(W) = ½ tr((W − W*) Σ (W − W*)ᵀ) − c·⟨R, W − W*⟩_F,    Σ = U diag(s) Uᵀ,   R = x u_0ᵀ

    ½ tr(ΔΣΔᵀ) = ½ E‖Δx‖² for inputs x ~ N(0, Σ): regression onto targets W* x. The Hessian is I_a ⊗ Σ with
    eigenvalues s_j (each a times); its eigenbasis is Z = Xᵀ (W − W*) U for a random orthogonal X (a×a)
    whose first column is x. The river is the direction R: the flattest input direction u_0 (smallest
    s_0 = μ, the river curvature) in output direction x, tilted by slope c; u = Z[0, 0] = ⟨R, W − W*⟩
    and the valley coordinates are the other a·b − 1 entries of Z (row-major).

    ``input_cov_spectrum``: b nonnegative eigenvalues (default :func:`flat_then_steep`: a few flat, the
    rest steep), sorted ascending; ``river_curvature`` overrides s_0 (0 gives a linear river).
    ``target``: ``'random'`` (W* ~ N(0, 1/b) entries, from ``seed``), ``'zero'``, or an [a, b] tensor.
    With s_0 = 0 and a > 1 the other a − 1 directions x_i u_0ᵀ are flat too but carry no slope: under noise
    they random-walk (the exact path handles them; ``init='stationary'`` refuses them).
    """

    def __init__(
        self,
        *,
        a: int,
        b: int,
        input_cov_spectrum: Sequence[float] | None = None,
        slope: float = 1.0,
        river_curvature: float | None = None,
        target="random",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        for name, val in (("a", a), ("b", b)):
            if isinstance(val, bool) or int(val) != val or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        self.a, self.b = int(a), int(b)
        self.shape = (self.a, self.b)
        self.dim = self.a * self.b
        self.dtype, self.device, self.seed = dtype, torch.device(device), int(seed)
        s = flat_then_steep(self.b) if input_cov_spectrum is None else np.asarray(input_cov_spectrum, float)
        if s.shape != (self.b,):
            raise ValueError(f"input_cov_spectrum must have b={self.b} entries, got shape {s.shape}")
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError("input_cov_spectrum must be finite and >= 0")
        s = np.sort(s)
        if river_curvature is not None:
            s[0] = _nonneg("river_curvature", river_curvature)
            if self.b > 1 and s[0] > s[1]:
                raise ValueError(f"river_curvature must be <= the next eigenvalue {s[1]}, got {s[0]}")
        self.slope = _finite("slope", slope)
        self.river_curvature = float(s[0])
        self.spectrum = s
        gen = torch.Generator().manual_seed(self.seed)
        self.U = _random_orthogonal(self.b, gen, dtype).to(self.device)
        self.X = _random_orthogonal(self.a, gen, dtype).to(self.device)
        self.Sigma = (self.U * torch.tensor(s, dtype=dtype, device=self.device)) @ self.U.T
        if isinstance(target, str):
            if target == "random":
                wstar = torch.randn(self.a, self.b, generator=gen, dtype=torch.float64) / math.sqrt(self.b)
            elif target == "zero":
                wstar = torch.zeros(self.a, self.b, dtype=torch.float64)
            else:
                raise ValueError(f"target must be 'random', 'zero' or an [a, b] tensor, got {target!r}")
        else:
            wstar = torch.as_tensor(target, dtype=torch.float64)
            if wstar.shape != self.shape or not torch.isfinite(wstar).all():
                raise ValueError(f"target must be a finite tensor of shape {self.shape}")
        self.target = wstar.to(dtype=dtype, device=self.device)
        self.R = torch.outer(self.X[:, 0], self.U[:, 0])  # unit Frobenius norm
        self._h = torch.tensor(np.tile(s, self.a), dtype=dtype, device=self.device)

    def to_eigen(self, theta):
        """Z = Xᵀ (W − W*) U, flattened row-major (index 0 = river)."""
        d = theta.reshape(-1, self.a, self.b) - self.target
        return (self.X.T @ d @ self.U).reshape(-1, self.dim)

    def from_eigen(self, z):
        """W = W* + X Z Uᵀ, flattened row-major."""
        return self._eigen_to_param_linear(z) + self.target.reshape(-1)

    def _eigen_to_param_linear(self, z):
        return (self.X @ z.reshape(-1, self.a, self.b) @ self.U.T).reshape(-1, self.dim)

    @_batched
    def grad(self, theta):
        """∇L = (W − W*) Σ − c·R."""
        d = theta.reshape(-1, self.a, self.b) - self.target
        return (d @ self.Sigma - self.slope * self.R).reshape(-1, self.dim)

    def river_direction(self, theta=None):
        """R = x u_0ᵀ flattened (constant; ``[S, p]`` if theta is given)."""
        d = self.R.reshape(-1).clone()
        if theta is not None and torch.as_tensor(theta).ndim == 2:
            return d.expand(theta.shape[0], -1).clone()
        return d

    def describe(self) -> dict:
        return {
            "name": "MatrixLeastSquares",
            "formula": "L = 1/2 tr((W-W*) Sigma (W-W*)^T) - c <R, W-W*>,  R = x u0^T",
            "dim": self.dim,
            "shape": self.shape,
            "slope": self.slope,
            "river_curvature": self.river_curvature,
            "river_optimum": self.river_optimum,
            "spectrum_range": [float(self.spectrum.min()), float(self.spectrum.max())],
            "seed": self.seed,
            "river": "the line W = W* + u * R (R: flattest input direction u0 times output direction x); "
            "floor: W - W* proportional to R",
        }


# --------------------------------------------------------------------------------------------------
# bending rivers in 2-D


class _CurvedRiver2D(Landscape):
    """L = −c·u(θ) + (λ/2)·v(θ)² for scalar fields u (progress) and v (signed distance-like offset from the
    floor v = 0). The river tangent at θ is the unit vector ⟂ ∇v oriented along ∇u."""

    dim = 2

    def __init__(self, slope: float, valley_curvature: float, dtype, device):
        self.slope = _finite("slope", slope)
        self.valley_curvature = _positive("valley_curvature", valley_curvature)
        self.dtype, self.device = dtype, torch.device(device)

    # subclasses: _u, _v, _grad_u, _grad_v (all on [S, 2]), floor(u)

    @_batched
    def loss(self, theta):
        v = self._v(theta)
        return -self.slope * self._u(theta) + 0.5 * self.valley_curvature * v * v

    @_batched
    def grad(self, theta):
        """∇L = −c ∇u + λ v ∇v."""
        return -self.slope * self._grad_u(theta) + (self.valley_curvature * self._v(theta))[
            :, None
        ] * self._grad_v(theta)

    @_batched
    def river_coordinate(self, theta):
        return self._u(theta)

    @_batched
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

    def _make_noise(self, sigma, river_sigma, kind):
        """Additive: σ ξ with its component along the local river tangent t rescaled to σ_u.
        Minibatch: σ_u (t·ξ) t + σ √(λ|∇v|²) (n·ξ) n (std ∝ √(local valley curvature))."""
        sigma, river_sigma = _check_noise(sigma, river_sigma, kind)
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
        self.amplitude = _finite("amplitude", amplitude)
        self.length = _positive("length", length)

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
