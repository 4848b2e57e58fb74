"""Simulate an optimizer on a landscape for S seeds at once and keep checkpoints (THEORY.md, "The toy model").

:func:`simulate` runs the step path (one batched optimizer step per iteration, no loop over seeds) or, for
SGD on a quadratic with a constant learning rate, the exact fast path that jumps from checkpoint to
checkpoint with the closed-form AR(1) transition of every eigen-coordinate.

Gradient noise (``noise`` = σ, ``river_noise`` = σ_u, default σ):

- ``'additive'``: g̃ = ∇L + n with n Gaussian; for the quadratics n has std σ_u on the river and σ on every
  valley eigen-coordinate (THEORY: v_{t+1} = (1 − ηλ)v_t + ησξ_t). With ``rotate=True`` and σ_u = σ this is
  isotropic noise in parameter space (the rotation leaves it unchanged). On the 2-D curved rivers the noise
  is isotropic σ with its component along the local river tangent rescaled to σ_u.
- ``'minibatch'``: noise covariance proportional to the curvature: valley eigen-coordinate i gets std
  σ·√λ_i (covariance σ²H, as for minibatch gradients of a least-squares loss), the river keeps σ_u. On the
  curved rivers the valley std is σ·√(λ|∇v|²), the local curvature across the floor.

Checkpoints: steps ``ckpt_from, ckpt_from + ckpt_every, ...`` up to ``steps``. Step k means θ_k, the
parameters after k updates, so ``ckpt_from=0`` includes the initial point θ_0. Ask for N checkpoints with
``n_ckpts`` (with ``ckpt_every``; ``steps`` then defaults to ``ckpt_from + (N − 1)·ckpt_every``).
"""

from rivervalley.simulate.exact import exact_transition
from rivervalley.simulate.plan import checkpoint_steps
from rivervalley.simulate.result import SimResult
from rivervalley.simulate.runner import simulate

__all__ = ["SimResult", "simulate", "checkpoint_steps", "exact_transition"]
