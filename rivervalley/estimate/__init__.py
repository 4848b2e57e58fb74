"""River-valley parameters of a real (or simulated) trajectory from the losses of merges inside it.

The model is THEORY.md's §g (any learning-rate schedule) written for an affine weight vector w over
checkpoints 1..N at steps t_j with learning rates η_j:

    L(w) = F(s(w)) + ω₀ · Σ_j w_j² r_j + ω₁ · Σ_jl w_j w_l √(r_j r_l) ρ^{|A_j − A_l|}

- ``A_j``: the learning-rate area Σ_{k<t_j} η_k from the first checkpoint, in units of the mean area
  between consecutive checkpoints (A_1 = 0, A_N = N − 1; with a constant learning rate A_j = j − 1);
  s(w) = Σ_j w_j A_j − A_N ≤ 0 is the merge's position along the river relative to the newest checkpoint
  (−lag in area units, §g), and F(s) = F0 + F1·s + ½F2·s² the river profile (F1 < 0: loss falls along it);
- ``r_j = η_j / max η``: the valley variance of a checkpoint follows its learning rate (§a and §g's
  adiabatic limit, V ∝ η), so under a decaying schedule older checkpoints are noisier;
- two groups of valley directions: steep ones that decorrelate between checkpoints (ω₀) and slow ones that
  decorrelate with the area between them at rate ρ per checkpoint interval of area (ω₁, §g: P ≈ e^{−λΔA}).

- a path that bends: if the trajectory's floor curves, θ(A) ≈ θ_N + a·(A − A_N) + ½·b·(A − A_N)² with b
  across the valley, then the merge Σw_jθ(A_j) = θ(s̄) + ½·b·B(w) leaves the floor by ½·b·B(w), with
  B(w) = Σw_j(A_j − A_N)² − s(w)², and pays κ·B(w)² (κ = λ_b|b|²/8 ≥ 0, λ_b the curvature across). Pair
  averages h apart pay κh⁴/16 (the sagitta of the chord); an extrapolation α·d past the window pays
  ~κα²(1+α)²d⁴: this term is what makes long extrapolations blow up on real runs.

Relative to the newest checkpoint, ΔL(w) = F1·s + ½F2·s² + ω₀(Σw_j²r_j − r_N) + ω₁(wᵀΓw − r_N) + κB(w)²;
with a constant learning rate and F2 = κ = 0 this is §d' (``theory.weights_delta_loss``).

The fit uses *calibration* merges that stay inside the data (nonnegative weights, s ≤ 0): every checkpoint,
pair averages of checkpoints h = 1, 2, 4, 8 apart, and uniform windows of 4 and 8 checkpoints. Points past
the newest checkpoint are never used
(on a curved path their loss explodes and dominates a least-squares fit). Given ρ the model is linear in
(F0, F1, F2, ω₀, ω₁, κ): least squares with ω, κ ≥ 0. ρ is profiled over a grid (0.02 … 0.99); its 90%
confidence set is {ρ: SSE(ρ) ≤ SSE_min · (1 + F₀.₉(1, dof)/dof)}. ρ is *identified* when that set stays off
the grid's upper edge (a slow group that never decorrelates inside the window cannot be told from the
river's curvature). Every prediction is the union, over ρ in its confidence set, of the least-squares
interval at that ρ: the interval includes the uncertainty in ρ.
"""

from .grid import Grid, calibration_weights
from .model import RHO_GRID, Fit, Interval, design, features, fit

__all__ = ["Grid", "Fit", "Interval", "calibration_weights", "fit", "design", "features", "RHO_GRID"]
