"""The study's theory: the fitted river-valley model, its α* per offset, its own merges, and the gate that
decides when those merges (and the theory's own pick) may be offered at all.

The gate exists because the theory left alone can harm: under a decaying learning rate the fitted valley
loss of the newest checkpoint goes to ≈ 0 and the river's curvature F2 < 0, and extrapolation then looks
free to the model while it costs nats on held-out text. A theory merge is offered only when

- the fit is trusted (:func:`fit_checks`), the river does not bend away (F2 is not more than one
  standard error below 0) and the newest
  checkpoint's valley loss is identified away from zero (its 90% interval above 0): the fit-level gate;
- it stays inside what the calibration half has measured: its lag (in learning-rate area), its ‖w‖₂ and,
  for Extra-Merge, its α lie within the range of the merges measured there;
- its own calibration ΔL is ≤ 0.
"""

from __future__ import annotations

import math

import numpy as np

from rivervalley import estimate as est
from rivervalley import weights as W

from .menu import extra

__all__ = [
    "Theory",
    "calibrate",
    "fit_checks",
    "alpha_theory",
    "theory_merges",
    "fit_gate",
    "Reach",
    "SIGN_TOL",
    "sign_class",
]

SIGN_TOL = 0.125  # |α| below this counts as α ≈ 0 (half the α grid's step)


class Theory:
    """The fitted §g model (``main``) and the same model with a bend term (``alt``, κ ≥ 0: the loss of
    leaving a curved path). Calibration inside the data cannot tell how fast the loss grows far off the
    path, so every prediction is the main model's value with an interval spanning both models' intervals,
    and α* counts as identified only where both models agree on its sign."""

    def __init__(self, main: est.Fit, alt: est.Fit):
        self.main, self.alt = main, alt
        self.grid, self.rho, self.best = main.grid, main.rho, main.best

    def predict(self, w) -> est.Interval:
        return _union(self.main.predict(w), self.alt.predict(w))

    def predict_between(self, w, base) -> est.Interval:
        return _union(self.main.predict_between(w, base), self.alt.predict_between(w, base))

    @property
    def slope(self) -> est.Interval:
        return self.main.slope

    @property
    def valley_loss(self) -> est.Interval:
        return self.main.valley_loss

    @property
    def curvature(self) -> est.Interval:
        """F2 of the main model: the river's curvature along the lag (< 0: it bends away)."""
        return self.main.curvature

    def optimal_weights(self):
        return self.main.optimal_weights()

    def to_dict(self) -> dict:
        return {**self.main.to_dict(), "with_bend": self.alt.to_dict()}


def _union(a: est.Interval, b: est.Interval) -> est.Interval:
    return est.Interval(a.value, min(a.lo, b.lo), max(a.hi, b.hi))


def calibrate(ev, grid: est.Grid, n: int, bar, lean: bool = False) -> tuple[Theory, dict, dict]:
    """Evaluate the calibration merges on the calibration half and fit; ``lean`` (quick mode): pairs 1 and
    4 apart only."""
    cal = est.calibration_weights(n, distances=(1, 4), windows=()) if lean else est.calibration_weights(n)
    losses, docs = {}, []
    for name, w in cal.items():
        dl = ev.measure(w, "calib")
        losses[name] = dl.loss
        docs.append(dl.nll)
        bar()
    args = (list(cal.values()), list(losses.values()), grid)
    doc = (np.stack(docs), dl.tokens)
    f = Theory(est.fit(*args, docs=doc), est.fit(*args, docs=doc, bend=True))
    return (
        f,
        losses,
        {"weights": {k: w.tolist() for k, w in cal.items()}, "doc_nll": [d.tolist() for d in docs]},
    )


def fit_checks(fit: Theory, calib_losses: dict) -> list[str]:
    """Reasons the fit cannot be trusted (empty: it can)."""
    out = []
    newest = calib_losses[f"ckpt {fit.grid.n}"]
    vl = fit.valley_loss
    if vl.value > newest:
        out.append(
            f"the fitted valley loss ({vl.value:.3g} nats) exceeds the newest checkpoint's loss "
            f"({newest:.3g})"
        )
    if fit.slope.value <= 0:
        out.append(f"the fitted river does not descend (slope {fit.slope.value:.3g} per checkpoint)")
    # a valley that changes faster than the learning rate explains: pair-average residuals drift
    res = _pair_residuals(fit, calib_losses)
    if res is not None:
        drift, se = res
        if abs(drift) > 3 * se and abs(drift) > 0.5 * abs(fit.best.beta[3] + fit.best.beta[4]) * 0.5:
            out.append(
                f"the valley is not stationary beyond the learning rate's account: the gain of averaging "
                f"neighbours drifts by {drift:+.3g} nats across the window ({abs(drift) / se:.1f} s.e.)"
            )
    return out


def _pair_residuals(fit: Theory, losses: dict):
    """Mean residual of the first-half minus the last-half neighbour pairs, and its standard error."""
    n = fit.grid.n
    rows = []
    for j in range(n - 1):
        key = f"pair {j + 1}+{j + 2}"
        if key in losses:
            w = np.zeros(n)
            w[j] = w[j + 1] = 0.5
            r = losses[key] - float(est.design(w, fit.grid, fit.rho)[0] @ fit.best.beta)
            rows.append((j, r))
    if len(rows) < 6:
        return None
    h = len(rows) // 2
    a = np.array([r for _, r in rows[:h]])
    b = np.array([r for _, r in rows[-h:]])
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) + 1e-12
    return float(b.mean() - a.mean()), se


def alpha_theory(fit: Theory, n: int, K: int, d: int, trusted: bool) -> dict:
    """α* of the main model; identified when the fit is trusted and its sign class (α ≈ 0 within
    ±SIGN_TOL, or its sign) is the same over ρ's confidence set, every leave-one-checkpoint-out refit, and
    the model with a bend term."""
    f = lambda a: W.extra(n, K, d, a)  # noqa: E731
    a = fit.main.alpha_star(f)
    lo, hi = fit.main.alpha_star_range(f)
    a_alt = fit.alt.alpha_star(f)
    lo_alt, hi_alt = fit.alt.alpha_star_range(f)
    signs = {sign_class(x) for x in (a, lo, hi, a_alt, lo_alt, hi_alt)}
    ident = trusted and math.isfinite(a) and len(signs) == 1
    return {
        "alpha_star": a if ident else None,
        "alpha_star_fit": a,
        "alpha_star_range": [min(lo, lo_alt), max(hi, hi_alt)],
        "alpha_star_with_bend": a_alt,
        "identified": ident,
        "sign": sign_class(a) if ident else None,
    }


def sign_class(a: float) -> int:
    return 0 if abs(a) < SIGN_TOL else (1 if a > 0 else -1)


def theory_merges(fit: Theory, theory: dict, n: int, K: int, trusted: bool) -> tuple[list, list]:
    """(candidates, diagnostics): Extra-Merge at each α* (a candidate where identified and |α*| ≤ 3) and
    the theory-optimal weights (a candidate where the fit is trusted and no weight exceeds 10); the rest
    are measured as diagnostics only. Candidates still pass the gate before they are offered."""
    own, diag = [], []
    for d, th in theory.items():
        a = th["alpha_star_fit"]
        if math.isfinite(a) and abs(a) <= 10:
            (own if th["identified"] and abs(a) <= 3 else diag).append(extra(n, K, d, a, kind="theory"))
    w = fit.optimal_weights()
    if w is not None and np.abs(w).max() < 50:
        x = {
            "name": "theory-optimal",
            "kind": "theory",
            "method": "custom",
            "weights": w,
            "group": "optimal",
            "recipe": {"method": "custom", "vector": w.tolist(), "name": "theory-optimal"},
        }
        (own if trusted and np.abs(w).max() <= 10 else diag).append(x)
    return own, diag


def fit_gate(fit: Theory, problems: list[str]) -> list[str]:
    """Why the theory's own merges and its pick are not offered on this run (empty: they may be)."""
    out = [f"the fit is not trusted: {p}" for p in problems]
    f2 = fit.curvature
    se = (f2.hi - f2.lo) / (2 * fit.main.t90)  # over ρ's confidence set: conservative
    if f2.value < -se:  # more than one s.e. below 0: a straight river's F2 = 0 passes 84% of the time
        out.append(
            f"the river bends away (F2 = {f2.value:.3g}, {-f2.value / max(se, 1e-300):.1f} s.e. below 0): "
            "extrapolation looks free to the model"
        )
    vl = fit.valley_loss
    if not vl.lo > 0:
        out.append(
            f"the newest checkpoint's valley loss is not identified away from zero "
            f"(90% interval [{vl.lo:.3g}, {vl.hi:.3g}])"
        )
    return out


class Reach:
    """What the calibration half has measured: the range of lag (−s, in learning-rate area), of ‖w‖₂ and of
    Extra-Merge's α over the merges evaluated there."""

    def __init__(self, grid: est.Grid, measured_weights, alphas):
        self._a = grid.area - grid.area[-1]
        W_ = np.stack([np.asarray(w, dtype=float) for w in measured_weights])
        s = W_ @ self._a
        norm = np.linalg.norm(W_, axis=1)
        self.lag = (float(-s.max()), float(-s.min()))
        self.norm = float(norm.max())
        self.alpha = (min([0.0, *alphas]), max([0.0, *alphas]))  # α = 0 is the window itself (SMA)

    def outside(self, c: dict) -> list[str]:
        """How candidate c reaches outside (empty: it stays inside)."""
        w = np.asarray(c["weights"], dtype=float)
        tol = 1e-9
        out = []
        lag = float(-(w @ self._a))
        if not self.lag[0] - tol <= lag <= self.lag[1] + tol:
            out.append(
                f"its lag {lag:+.3g} lies outside the calibrated [{self.lag[0]:+.3g}, {self.lag[1]:+.3g}]"
            )
        norm = float(np.linalg.norm(w))
        if norm > self.norm + tol:
            out.append(f"its ‖w‖ {norm:.3g} exceeds the calibrated {self.norm:.3g}")
        a = c.get("alpha")
        if c["method"] == "extra" and a is not None and not self.alpha[0] - tol <= a <= self.alpha[1] + tol:
            out.append(f"its α {a:+.3g} lies outside the calibrated [{self.alpha[0]:+g}, {self.alpha[1]:+g}]")
        return out
