"""Extrapolation on a river whose floor bends (SineRiver, HyperbolaRiver): measured against an estimate.

No closed form covers a bending floor, so the theory's estimate of ΔL(α) for a family of merges w(α) is

    ΔL_est(α) = L(Σ_j w_j θ̄_j) − L(θ̄_N) − ω (1 − wᵀΓ(ρ) w)

with θ̄ the noise-free path (so the bend, and the straight line leaving it, are exact) and the valley noise
of THEORY.md §a/§d' at the local valley curvature λ_eff = λ|∇v|² of the newest checkpoint: ρ = (1 − ηλ_eff)^s,
ω = ησ²/(2(2 − ηλ_eff)). The measurement simulates the noisy SGD path (noise across the floor only, as in
§d' where σ_u = 0) for many seeds on a grid of α, since ΔL(α) is no longer quadratic in α.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BendingRiver"]

SHAPES = ("sine", "hyperbola")


@dataclass(frozen=True)
class BendingRiver:
    """SGD at constant η on a 2-D river whose floor bends: ``'sine'`` (y = a·sin(x/ℓ), L = −c·x +
    (λ/2)(y − a sin(x/ℓ))²) or ``'hyperbola'`` (w1·w2 = 1, u = (w1² − w2²)/2). The run starts on the floor
    at river coordinate ``start``; checkpoints every ``interval`` steps after ``burn_in`` steps (default:
    ten valley relaxation times, 10/(ηλ_eff))."""

    shape: str = "sine"
    slope: float = 1.0
    valley_curvature: float = 10.0
    amplitude: float = 1.0
    length: float = 2.0
    lr: float = 0.02
    interval: int = 10
    noise: float = 0.5
    start: float = 0.0
    burn_in: int | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"BendingRiver: shape must be one of {SHAPES}, got {self.shape!r}")
        for name in ("slope", "valley_curvature", "amplitude", "length", "lr", "noise", "start"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"BendingRiver: {name} must be finite, got {value}")
            object.__setattr__(self, name, value)
        if self.lr <= 0 or self.valley_curvature <= 0 or self.length <= 0 or self.noise < 0:
            raise ValueError("BendingRiver: lr, valley_curvature and length must be > 0, noise >= 0")
        if isinstance(self.interval, bool) or int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"BendingRiver: interval must be an integer >= 1, got {self.interval!r}")
        object.__setattr__(self, "interval", int(self.interval))
        lam = self.local_curvature(self.landscape().floor([self.start])[0])
        if not 0 < self.lr * lam < 2:
            raise ValueError(
                f"BendingRiver: lr*valley curvature at the start is {self.lr * lam:.4g}, not in (0, 2)"
            )

    def landscape(self):
        from rivervalley.landscapes import HyperbolaRiver, SineRiver

        if self.shape == "sine":
            return SineRiver(
                slope=self.slope, valley_curvature=self.valley_curvature, amplitude=self.amplitude,
                length=self.length,
            )  # fmt: skip
        return HyperbolaRiver(slope=self.slope, valley_curvature=self.valley_curvature)

    def local_curvature(self, theta) -> float:
        """λ_eff = λ|∇v|² at θ: the loss curvature across the floor."""
        return float(self.landscape().valley_curvature_at(theta))

    def _burn(self) -> int:
        if self.burn_in is not None:
            return int(self.burn_in)
        lam = self.local_curvature(self.landscape().floor([self.start])[0])
        return math.ceil(10.0 / (self.lr * lam))

    def simulate(self, n: int, *, seeds: int = 1000, seed: int = 0, noise: float | None = None):
        """n checkpoints of ``seeds`` SGD runs (step path; noise across the floor only)."""
        from rivervalley.simulate import simulate

        land = self.landscape()
        return simulate(
            land,
            lr=self.lr,
            seeds=seeds,
            noise=self.noise if noise is None else noise,
            river_noise=0.0,
            ckpt_every=self.interval,
            n_ckpts=n,
            ckpt_from=self._burn(),
            init=land.floor([self.start])[0],
            seed=seed,
        )

    @functools.lru_cache(maxsize=4)  # noqa: B019 - frozen and hashable; a few paths per check
    def _noise_free(self, n: int):
        path = self.simulate(n, seeds=1, noise=0.0).checkpoints[0]
        lam = [
            self.local_curvature(theta) if bool(np.isfinite(theta.numpy()).all()) else math.inf
            for theta in path
        ]
        if not max(lam) * self.lr < 2:
            raise ValueError(
                f"BendingRiver: SGD is unstable by checkpoint {n}: lr*valley curvature reaches "
                f"{max(lam) * self.lr:.4g} >= 2 as the valley steepens; lower lr, interval or the checkpoints"
            )
        return path

    def estimate(self, ws: np.ndarray) -> tuple[np.ndarray, float]:
        """ΔL_est for each weight vector of ``ws`` [G, n] (module docstring); also the newest checkpoint's
        river coordinate on the noise-free path."""
        from rivervalley import theory
        from rivervalley import weights as W

        land, ck = self.landscape(), self._noise_free(ws.shape[1])
        merged = W.apply(ws, ck)
        river = (land.loss(merged) - land.loss(ck[-1][None])).double().numpy()
        lam = self.local_curvature(ck[-1])
        # the §d' valley term −ω(1 − wᵀΓ(ρ)w): the closed form with no river slope
        noise = theory.weights_delta_loss(
            ws, slope=0.0, lr=self.lr, interval=self.interval, curvatures=[lam], noise=self.noise
        )
        return river + noise, float(land.river_coordinate(ck[-1]))

    def measure(self, ws: np.ndarray, *, seeds: int, seed: int) -> np.ndarray:
        """Per-seed ΔL of each weight vector of ``ws`` [G, n]: [seeds, G]."""
        from rivervalley import weights as W

        sim = self.simulate(ws.shape[1], seeds=seeds, seed=seed)
        land, ck = sim.landscape, sim.checkpoints
        merged = W.apply(ws, ck)  # [S, G, 2]
        s, g, p = merged.shape
        loss = land.loss(merged.reshape(s * g, p)).reshape(s, g)
        out = (loss - land.loss(ck[:, -1])[:, None]).double().numpy()
        if not np.all(np.isfinite(out)):
            raise ValueError(
                "BendingRiver: some noisy runs diverge (lr*valley curvature near 2); lower lr or noise"
            )
        return out
