"""Quadratic landscapes with an eigenbasis (river = eigen-coordinate 0): :class:`QuadraticRiverValley` and the
matrix least-squares :class:`MatrixLeastSquares` (for Muon), on their shared base :class:`EigenQuadratic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from rivervalley.landscapes.base import (
    Landscape,
    batched,
    check_noise,
    finite,
    nonneg,
    positive,
    random_orthogonal,
)

__all__ = ["EigenQuadratic", "QuadraticRiverValley", "MatrixLeastSquares", "flat_then_steep"]


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
        [np.full(n_flat, nonneg("flat", flat)), np.full(b - n_flat, nonneg("steep", steep))]
    )


class EigenQuadratic(Landscape):
    """L = −c·z_0 + ½ Σ_k h_k z_k² in eigen-coordinates z = to_eigen(θ); z_0 is the river (h_0 = μ),
    z_1.. the valley (h_k = λ_k)."""

    slope: float
    river_curvature: float
    eigenvalues: torch.Tensor  # [p] Hessian eigenvalues in eigen order (index 0 = river)

    # subclasses: to_eigen, from_eigen, _eigen_to_param_linear, grad, river_direction, describe

    @property
    def m(self) -> int:
        """Number of valley directions (p − 1)."""
        return self.dim - 1

    @property
    def curvatures(self) -> np.ndarray:
        """Valley curvatures λ_1..λ_m (numpy, eigen order)."""
        return self.eigenvalues[1:].cpu().double().numpy()

    @property
    def river_optimum(self) -> float | None:
        """u* = c/μ for a curved river (μ > 0), None for a linear one."""
        return self.slope / self.river_curvature if self.river_curvature > 0 else None

    def hessian_eigen(self) -> np.ndarray:
        """Hessian eigenvalues in eigen order: ``[μ, λ_1, ..., λ_m]`` (numpy float64)."""
        return self.eigenvalues.cpu().double().numpy().copy()

    @batched
    def loss(self, theta):
        """L = −c·u + (μ/2)u² + ½ Σ_i λ_i v_i² (the river's optimum, if any, is not subtracted)."""
        z = self.to_eigen(theta)
        return 0.5 * (z * z) @ self.eigenvalues - self.slope * z[:, 0]

    @batched
    def river_coordinate(self, theta):
        """u = z_0."""
        return self.to_eigen(theta)[:, 0]

    @batched
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
        sigma, river_sigma = check_noise(sigma, river_sigma, kind)
        h = self.hessian_eigen()
        std = np.full(self.dim, sigma) if kind == "additive" else sigma * np.sqrt(h)
        std[0] = river_sigma
        return std

    def stationary_variance(
        self, lr: float, sigma: float, river_sigma: float | None = None, kind: str = "additive"
    ) -> np.ndarray:
        """THEORY §a: V_k = η σ_k² / (h_k (2 − η h_k)) per eigen-coordinate (inf where h_k = 0); requires
        0 < η h_k < 2 wherever h_k > 0."""
        lr = positive("lr", lr)
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

    def make_noise(self, sigma, river_sigma, kind):
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


class QuadraticRiverValley(EigenQuadratic):
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
        self.slope = finite("slope", slope)
        self.river_curvature = nonneg("river_curvature", river_curvature)
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
                positive("power_law lam_max", lam_max)
                finite("power_law exponent", exponent)
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
        self.eigenvalues = torch.tensor(
            np.concatenate([[self.river_curvature], lam]), dtype=dtype, device=self.device
        )
        if self.rotate:
            gen = torch.Generator().manual_seed(self.seed)
            self.Q = random_orthogonal(self.dim, gen, dtype).to(self.device)  # columns: river, valley dirs
            self._A = (self.Q * self.eigenvalues) @ self.Q.T  # Hessian in parameter coordinates
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
    @batched
    def grad(self, theta):
        """∇L = H θ − c·q_0 with H = Q diag(μ, λ) Qᵀ and q_0 the river direction."""
        return self.grad_into(theta, torch.empty_like(theta))

    def grad_into(self, theta, out):
        if self.rotate:
            torch.matmul(theta, self._A, out=out)
            out.add_(self._g0)
        else:
            torch.mul(theta, self.eigenvalues, out=out)
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


class MatrixLeastSquares(EigenQuadratic):
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
            s[0] = nonneg("river_curvature", river_curvature)
            if self.b > 1 and s[0] > s[1]:
                raise ValueError(f"river_curvature must be <= the next eigenvalue {s[1]}, got {s[0]}")
        self.slope = finite("slope", slope)
        self.river_curvature = float(s[0])
        self.spectrum = s
        gen = torch.Generator().manual_seed(self.seed)
        self.U = random_orthogonal(self.b, gen, dtype).to(self.device)
        self.X = random_orthogonal(self.a, gen, dtype).to(self.device)
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
        self.eigenvalues = torch.tensor(np.tile(s, self.a), dtype=dtype, device=self.device)

    def to_eigen(self, theta):
        """Z = Xᵀ (W − W*) U, flattened row-major (index 0 = river)."""
        d = theta.reshape(-1, self.a, self.b) - self.target
        return (self.X.T @ d @ self.U).reshape(-1, self.dim)

    def from_eigen(self, z):
        """W = W* + X Z Uᵀ, flattened row-major."""
        return self._eigen_to_param_linear(z) + self.target.reshape(-1)

    def _eigen_to_param_linear(self, z):
        return (self.X @ z.reshape(-1, self.a, self.b) @ self.U.T).reshape(-1, self.dim)

    @batched
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
