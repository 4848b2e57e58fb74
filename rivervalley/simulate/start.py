"""The initial point θ_0 of a simulation: zero, a given tensor, or the stationary distribution (THEORY §a)."""

from __future__ import annotations

import math

import numpy as np
import torch

from rivervalley.landscapes import EigenQuadratic

__all__ = ["INITS", "initial_theta"]

INITS = ("zero", "stationary")


def initial_theta(
    landscape, init, s_count, lr0, noise, river_noise, noise_kind, river_start, gen, device, dtype
):
    p = landscape.dim
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} or a tensor, got {init!r}")
        if init == "zero":
            if river_start is not None:
                raise ValueError("river_start is only used with init='stationary'")
            return torch.zeros(s_count, p, dtype=dtype, device=device)
        if not isinstance(landscape, EigenQuadratic):
            raise ValueError(f"init='stationary' needs a quadratic landscape, got {type(landscape).__name__}")
        try:
            var = landscape.stationary_variance(lr0, noise, river_noise, noise_kind)
        except ValueError as e:
            raise ValueError(f"init='stationary' needs lr*curvature in (0, 2): {e}") from None
        if not np.all(np.isfinite(var[1:])):
            raise ValueError("init='stationary' needs every valley curvature > 0")
        mu = landscape.river_curvature
        if river_start is None:
            river_start = landscape.river_optimum if mu > 0 else 0.0
        river_start = float(river_start)
        if not math.isfinite(river_start):
            raise ValueError(f"river_start must be finite, got {river_start}")
        std = np.sqrt(np.where(np.isfinite(var), var, 0.0))
        z = torch.randn(s_count, p, generator=gen, dtype=dtype, device=device)
        z.mul_(torch.as_tensor(std, dtype=dtype, device=device))
        z[:, 0] += river_start
        return landscape.from_eigen(z).contiguous()
    if river_start is not None:
        raise ValueError("river_start is only used with init='stationary'")
    theta0 = torch.as_tensor(init).detach().to(dtype=dtype, device=device)
    if theta0.ndim == 1:
        theta0 = theta0.expand(s_count, -1)
    if theta0.shape != (s_count, p):
        raise ValueError(f"init must have shape [{p}] or [{s_count}, {p}], got {tuple(theta0.shape)}")
    if not torch.isfinite(theta0).all():
        raise ValueError("init must be finite (got NaN or inf)")
    return theta0.clone().contiguous()
