"""Predicted versus simulated: every closed form of THEORY.md §a–§f against the package's own simulator.

Each row of the table is one quantity in one scenario: the formula's value (``rivervalley.theory``), the
mean over independent seeds of a per-seed statistic whose expectation the formula states, its standard
error (from the spread across seeds, so correlations inside a trajectory are accounted for) and
z = (mean − formula) / se. Three kinds of check:

- ``=``  the theory states the expectation exactly: fails when |z| > 4;
- ``≥``  the theory states a lower bound (E FVE_1 ≥ S/(S + ΣN)): fails when z < −4;
- ``≈``  an approximation the theory says is biased (FVE_1 ≈ (S + ΣN∥)/(S + ΣN)): reported with its bias,
  never gated.

Where the theory is a continuous-time limit (§f) the exact discrete value is a row of its own and the
continuous formula a second row whose scenario keeps its discretisation bias far below the standard error
(the bias is printed in the note).

Paths: the exact AR(1) fast path of :func:`rivervalley.simulate.simulate` is built from the §a transition
itself, so every §a/§b row (and most others) runs the step path — real SGD steps from θ_0 = 0 with a
burn-in — and only §c and §d' (which test the merging layer, not the AR(1)) use the exact path; §f uses it
for the burn-in to stationarity only. Gaussian draws are float64 throughout.
"""

from rivervalley.validate.grid import plan, run
from rivervalley.validate.report import Z_MAX, Report, Row, Study, format_table
from rivervalley.validate.sampling import decay_average_samples, delta_loss_samples, fve_samples

__all__ = [
    "Z_MAX",
    "Row",
    "Study",
    "Report",
    "plan",
    "run",
    "format_table",
    "delta_loss_samples",
    "fve_samples",
    "decay_average_samples",
]
