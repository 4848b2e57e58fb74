"""The landscape protocol (:class:`Landscape`) and the argument checks and helpers its implementations
share."""

from __future__ import annotations

import copy
import math

import torch

__all__ = [
    "Landscape",
    "NOISE_KINDS",
    "finite",
    "nonneg",
    "positive",
    "random_orthogonal",
    "batched",
    "check_noise",
]

NOISE_KINDS = ("additive", "minibatch")


# --------------------------------------------------------------------------------------------------
# helpers


def finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def nonneg(name: str, value: float) -> float:
    value = finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def positive(name: str, value: float) -> float:
    value = finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def random_orthogonal(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Haar-distributed orthogonal n×n matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).to(dtype)


def batched(fn):
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


def check_noise(sigma: float, river_sigma: float | None, kind: str) -> tuple[float, float]:
    sigma = nonneg("noise", sigma)
    river_sigma = sigma if river_sigma is None else nonneg("river_noise", river_sigma)
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {kind!r}")
    return sigma, river_sigma


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

    # ---- simulator hooks (used by rivervalley.simulate) ----
    def grad_into(self, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``grad(theta)`` into ``out`` (subclasses avoid temporaries)."""
        out.copy_(self.grad(theta))
        return out

    def make_noise(self, sigma: float, river_sigma: float | None, kind: str):
        """Return ``add_noise(g, xi, theta) -> g``: add to the gradient ``g`` [S, p] (in place) the gradient
        noise made from the standard normals ``xi`` [S, p] (any float dtype, never modified); ``None`` when
        there is no noise."""
        raise NotImplementedError  # pragma: no cover
