"""A river valley with known parameters: what a test simulates and what the theory predicts for it.

:class:`RiverValley` holds the THEORY.md toy model's numbers (slope c, learning rate η, checkpoint interval
s, valley curvatures λ_i, gradient noise σ, and for a curved river μ, σ_u and the start offset e0), builds
its landscape, simulates it exactly (closed-form AR(1) jumps from the stationary state, no Python loop over
seeds) and scores any affine weight vector with the closed forms of :mod:`rivervalley.theory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RiverValley"]


@dataclass(frozen=True)
class RiverValley:
    """Linear river (``river_curvature=0``) or curved river g(u) = −cu + (μ/2)u² with SGD at constant η.

    ``curvatures``: the valley λ_i (0 < ηλ_i < 2; ηλ_i > 1 with an odd ``interval`` gives ρ_i < 0).
    ``e0``: for a curved river, where the first checkpoint's river coordinate starts relative to the
    optimum u* = c/μ (negative: still descending towards it).
    """

    slope: float = 1.0
    lr: float = 0.5
    interval: int = 1
    curvatures: tuple[float, ...] = (1.0,)
    noise: float = 1.0
    river_curvature: float = 0.0
    river_noise: float = 0.0
    e0: float = 0.0

    def __post_init__(self):
        lam = tuple(float(x) for x in np.atleast_1d(np.asarray(self.curvatures, dtype=float)))
        object.__setattr__(self, "curvatures", lam)
        for name in ("slope", "lr", "noise", "river_curvature", "river_noise", "e0"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"RiverValley: {name} must be finite, got {value}")
            object.__setattr__(self, name, value)
        if isinstance(self.interval, bool) or int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"RiverValley: interval must be an integer >= 1, got {self.interval!r}")
        object.__setattr__(self, "interval", int(self.interval))
        if self.lr <= 0 or self.noise < 0 or self.river_noise < 0 or self.river_curvature < 0:
            raise ValueError("RiverValley: lr must be > 0 and noise, river_noise, river_curvature >= 0")
        products = self.lr * np.array(lam + (self.river_curvature,))
        if not lam or np.any(products[:-1] <= 0) or np.any(products >= 2):
            raise ValueError(
                f"RiverValley: every lr*curvature must lie in (0, 2) (stable SGD, a stationary valley), "
                f"got lr={self.lr:g}, curvatures={list(lam)}, river_curvature={self.river_curvature:g}"
            )

    # ---- derived quantities (THEORY.md notation) ----
    @property
    def curved(self) -> bool:
        return self.river_curvature > 0

    @property
    def rho(self) -> np.ndarray:
        """Checkpoint-level AR(1) coefficients ρ_i = (1 − ηλ_i)^s of the valley directions."""
        return (1.0 - self.lr * np.asarray(self.curvatures)) ** self.interval

    @property
    def omega(self) -> np.ndarray:
        """Valley loss of one checkpoint per direction, ω_i = ησ²/(2(2 − ηλ_i))."""
        return self.lr * self.noise**2 / (2.0 * (2.0 - self.lr * np.asarray(self.curvatures)))

    @property
    def drift(self) -> float:
        """River progress per checkpoint on a linear river, D = ηcs."""
        return self.lr * self.slope * self.interval

    @property
    def river_optimum(self) -> float | None:
        return self.slope / self.river_curvature if self.curved else None

    def _linear_kw(self) -> dict:
        return dict(slope=self.slope, lr=self.lr, interval=self.interval, curvatures=list(self.curvatures))

    def _curved_kw(self, start: int) -> dict:
        return dict(
            river_curvature=self.river_curvature,
            lr=self.lr,
            interval=self.interval,
            curvatures=list(self.curvatures),
            e0=self.e0,
            start=start,
            noise=self.noise,
            river_noise=self.river_noise,
        )

    # ---- theory ----
    def delta_loss(self, weights, *, start: int = 0) -> float | np.ndarray:
        """Closed-form E L(Σ w_j θ^(j)) − E L(θ^(N)) of THEORY.md §d' (linear river) or its curved-river
        form (:func:`rivervalley.theory.curved_weights_delta_loss`; checkpoint 1 at step ``start``·s)."""
        from rivervalley import theory

        if self.curved:
            return theory.curved_weights_delta_loss(weights, **self._curved_kw(start))
        return theory.weights_delta_loss(weights, noise=self.noise, **self._linear_kw())

    def optimal_weights(self, n: int) -> np.ndarray:
        """The theory-optimal affine merge of n checkpoints on the linear river (§d')."""
        from rivervalley import weights

        if self.curved:
            raise ValueError("optimal_weights is the linear-river optimum: use river_curvature=0")
        return weights.optimal(n, noise=self.noise, **self._linear_kw())

    # ---- simulation ----
    def landscape(self, *, rotate: bool = False, seed: int = 0):
        """The :class:`~rivervalley.landscapes.QuadraticRiverValley` with these numbers."""
        from rivervalley.landscapes import QuadraticRiverValley

        return QuadraticRiverValley(
            slope=self.slope,
            river_curvature=self.river_curvature,
            curvatures=list(self.curvatures),
            rotate=rotate,
            seed=seed,
        )

    def simulate(self, n: int, *, seeds: int = 1000, seed: int = 0, start: int = 0, rotate: bool = False):
        """n checkpoints every ``interval`` steps for ``seeds`` runs, from the stationary valley (and, when
        curved, u_0 = u* + e0 plus stationary river noise); checkpoint 1 is step ``start``·s. Exact jumps.
        Returns a :class:`~rivervalley.simulate.SimResult` (``checkpoints`` [seeds, n, 1 + m])."""
        from rivervalley.simulate import simulate

        land = self.landscape(rotate=rotate, seed=seed)
        river_start = self.river_optimum + self.e0 if self.curved else 0.0
        return simulate(
            land,
            lr=self.lr,
            seeds=seeds,
            noise=self.noise,
            river_noise=self.river_noise if self.curved else 0.0,
            ckpt_every=self.interval,
            n_ckpts=n,
            ckpt_from=start * self.interval,
            init="stationary",
            river_start=river_start,
            exact=True,
            seed=seed,
        )
