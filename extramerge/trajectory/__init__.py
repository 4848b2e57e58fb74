"""Trajectory diagnostics of real checkpoints from ONE streaming pass: the N×N Gram matrix.

The pass (``gram_pass``) reads every floating-point tensor of every checkpoint once and accumulates, in
float64, the Gram matrix of the checkpoints' *differences from a reference checkpoint*:

    G_ij = ⟨θ_i − θ_ref, θ_j − θ_ref⟩          (overall, and per tensor: Σ_tensors G^t = G)

Why differences: late in training the checkpoints differ by ~1e-4 of the weights' size. The raw Gram
⟨θ_i, θ_j⟩ is then dominated by ‖θ‖², and centring it afterwards (HGH) subtracts numbers that agree in
their first 8 digits: catastrophic cancellation leaves noise where the spread should be. θ_i − θ_ref is
formed in float64 from the (exact) float32/bf16 values, so the spread is kept to full precision.
Centring is invariant to the reference (H(X − 1θ_refᵀ) = HX), so every PCA quantity, merged Gram
(W G Wᵀ for affine rows), displacement cosine and PC1 trend is unchanged by the choice of reference.

Everything else (PCA spectra, SMA-merged spectra, cosines, PC1 drift, the per-layer rank-1 map, α
estimates) is computed from these matrices; ``GramData.save`` keeps them (``gram.npz``) so later steps
(``--method pc1``, α selection) need no further pass.

Modules: ``data`` (``GramData``, gram.npz), ``gram`` (the pass), ``report`` (``summarize``,
``project_scores``) and ``analyze`` (``analyze``, ``write_outputs``: the command's outputs).
"""

from .analyze import analyze
from .data import GramData, load_gram
from .gram import gram_pass
from .report import DEFAULT_WINDOWS, project_scores, summarize

__all__ = ["GramData", "gram_pass", "load_gram", "summarize", "analyze", "project_scores", "DEFAULT_WINDOWS"]
