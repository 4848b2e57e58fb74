"""The study: which merge of a run's checkpoints to ship, its predicted gain, and the gain measured.

1. Held-out text is split by document into a *calibration* half and a *measurement* half.
2. On the calibration half: the loss of every calibration merge (``rivervalley.estimate.calibration_weights``:
   checkpoints, pair averages and windows, all inside the data) fits the river-valley model with the
   learning rate at each checkpoint (``rivervalley.estimate``); the candidates (newest checkpoint, SMA, EMA,
   Extra-Merge over an α grid) are evaluated and the best is *recommended* (empirical selection), with the
   theory's prediction and 90% interval beside it, or "not identified" when the fit is degenerate.
3. On the measurement half (skipped by ``quick``): every candidate, α = 3, the theory's α* and its optimal
   weight vector; ΔL relative to the newest checkpoint with a paired standard error clustered by document.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import estimate as est
from rivervalley import weights as W

from .evaluator import Evaluator, paired_delta
from .inputs import (
    StudyError,
    check_half,
    load_documents,
    read_checkpoints,
    read_lr_schedule,
    split_documents,
    tokenizer_of,
)

__all__ = ["StudyConfig", "run_study", "CANDIDATE_ALPHAS"]

CANDIDATE_ALPHAS = (-0.5, -0.25, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
SIGN_TOL = 0.125  # |α| below this counts as α ≈ 0 (half the α grid's step)


@dataclass
class StudyConfig:
    checkpoints: list
    out: Path
    data: list = field(default_factory=list)  # text split into the two halves
    calib: str | None = None  # or the two halves given
    test: str | None = None
    tokenizer: str | None = None
    lr_schedule: str | None = None
    run: Path | None = None  # a run folder: its log.jsonl / run.json give the lr by default
    window: int = 4  # K of Extra-Merge
    offsets: tuple = (2, 4, 8)
    alphas: tuple = CANDIDATE_ALPHAS
    sma_windows: tuple = (2, 4, 8)
    ema_decays: tuple = (0.5, 0.8, 0.9)
    quick: bool = False
    device: str = "cpu"
    batch_size: int = 16
    threads: int | None = None
    force: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------------------------- menu


def candidates(n: int, cfg: StudyConfig) -> tuple[list[dict], list[int]]:
    """The merges the recommendation chooses from: name, method, knobs, weights (oldest first)."""
    K = cfg.window
    if n < K + 1:
        raise StudyError(f"{n} checkpoints: Extra-Merge with --window {K} needs at least {K + 1}")
    offsets = [d for d in cfg.offsets if 1 <= d and K + d <= n]
    if not offsets:
        raise StudyError(f"--offsets {list(cfg.offsets)}: none fits K + d <= {n} checkpoints (K = {K})")
    out = [{"name": "last", "method": "last", "weights": np.eye(n)[-1]}]
    for k in cfg.sma_windows:
        if 2 <= k <= n:
            out.append({"name": f"SMA K={k}", "method": "sma", "window": k, "weights": W.sma(n, k)})
    for b in cfg.ema_decays:
        out.append({"name": f"EMA beta={b:g}", "method": "ema", "decay": b, "weights": W.ema(n, b)})
    for d in offsets:
        for a in cfg.alphas:
            if a != 0:
                out.append(_extra(n, K, d, a))
    return out, offsets


def _extra(n, K, d, a) -> dict:
    return {
        "name": f"Extra K={K} d={d} alpha={a:g}",
        "method": "extra",
        "window": K,
        "offset": d,
        "alpha": float(a),
        "weights": W.extra(n, K, d, a),
    }


# -------------------------------------------------------------------------------------------- theory


class Theory:
    """The fitted §g model (``main``) and the same model with a bend term (``alt``, κ ≥ 0: the loss of
    leaving a curved path). Calibration inside the data cannot tell how fast the loss grows far off the
    path, so every prediction is the main model's value with an interval spanning both models' intervals,
    and α* counts as identified only where both models agree on its sign."""

    def __init__(self, main: est.Fit, alt: est.Fit):
        self.main, self.alt = main, alt
        self.grid, self.rho, self.best = main.grid, main.rho, main.best

    def predict(self, w) -> est.Interval:
        a, b = self.main.predict(w), self.alt.predict(w)
        return est.Interval(a.value, min(a.lo, b.lo), max(a.hi, b.hi))

    @property
    def slope(self) -> est.Interval:
        return self.main.slope

    @property
    def valley_loss(self) -> est.Interval:
        return self.main.valley_loss

    def optimal_weights(self):
        return self.main.optimal_weights()

    def to_dict(self) -> dict:
        return {**self.main.to_dict(), "with_bend": self.alt.to_dict()}


def calibrate(ev: Evaluator, grid: est.Grid, n: int, bar, lean: bool = False) -> tuple[Theory, dict, dict]:
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
    signs = {_sign(x) for x in (a, lo, hi, a_alt, lo_alt, hi_alt)}
    ident = trusted and math.isfinite(a) and len(signs) == 1
    return {
        "alpha_star": a if ident else None,
        "alpha_star_fit": a,
        "alpha_star_range": [min(lo, lo_alt), max(hi, hi_alt)],
        "alpha_star_with_bend": a_alt,
        "identified": ident,
        "sign": _sign(a) if ident else None,
    }


def _sign(a: float) -> int:
    return 0 if abs(a) < SIGN_TOL else (1 if a > 0 else -1)


# ---------------------------------------------------------------------------------------------- study


def run_study(cfg: StudyConfig, tmp: Path) -> dict:
    """Run the study; figures go under ``tmp``; returns the report (the caller writes and publishes)."""
    t0 = time.perf_counter()
    ckpts, infos = read_checkpoints(cfg.checkpoints)
    try:
        return _study(cfg, ckpts, list(infos), tmp, t0)
    finally:
        for c in ckpts:
            c.close()


def _halves(cfg: StudyConfig) -> tuple[list[str], list[str], dict]:
    if cfg.calib or cfg.test:
        if not (cfg.calib and cfg.test) or cfg.data:
            raise StudyError("give --data TEXT, or both --calib FILE and --test FILE")
        calib, test = load_documents([cfg.calib]), load_documents([cfg.test])
        check_half(calib, f"--calib {cfg.calib}")
        check_half(test, f"--test {cfg.test}")
        return calib, test, {"calib": str(cfg.calib), "test": str(cfg.test)}
    if not cfg.data:
        raise StudyError("no held-out text: give --data TEXT (or --calib FILE --test FILE)")
    docs = load_documents(cfg.data)
    calib, test = split_documents(docs, ", ".join(map(str, cfg.data)))
    return (
        calib,
        test,
        {"data": [str(p) for p in cfg.data], "split": "by SHA-256 of each document, alternately"},
    )


def _study(cfg: StudyConfig, ckpts, names, tmp: Path, t0: float) -> dict:
    n = len(ckpts)
    steps = [int(c.step) for c in ckpts]
    menu, offsets = candidates(n, cfg)
    calib_docs, test_docs, source = _halves(cfg)
    tok = tokenizer_of(ckpts, cfg.tokenizer)
    lr = read_lr_schedule(cfg.lr_schedule, steps, cfg.run)
    try:
        grid = est.Grid.from_schedule(steps, lr) if lr is not None else _steps_grid(steps)
    except ValueError as e:
        raise StudyError(f"--lr-schedule: {e}") from None

    if cfg.threads and not str(cfg.device).startswith("cuda"):
        import torch

        torch.set_num_threads(cfg.threads)
    ev = Evaluator(ckpts, names, tok, device=cfg.device, batch_size=cfg.batch_size)
    ev.add_half("calib", calib_docs)
    ev.add_half("test", test_docs)
    bar = _Bar(cfg.progress)
    try:
        fit, cal_losses, cal_detail = calibrate(ev, grid, n, bar, lean=cfg.quick)
        problems = fit_checks(fit, cal_losses)
        trusted = not problems
        K = cfg.window
        theory = {d: alpha_theory(fit, n, K, d, trusted) for d in offsets}
        # the theory's own merges join the candidates where it is trusted: Extra-Merge at an identified α*,
        # the theory-optimal weight vector; elsewhere they are only measured (diagnostics)
        own, diag = _theory_merges(fit, theory, n, K, trusted)
        menu = menu + own

        # the recommendation: empirical selection on the calibration half
        base_c = ev.measure(np.eye(n)[-1], "calib")
        pool = menu if not cfg.quick else _quick_pool(menu, fit, trusted)
        for c in pool:
            dl = base_c if c["method"] == "last" else ev.measure(c["weights"], "calib")
            c["calib_delta"], c["calib_se"] = paired_delta(dl, base_c)
            bar()
        for c in menu:
            p = fit.predict(c["weights"])
            c["predicted"] = {"delta": p.value, "interval": p.to_list()}
        best = min(pool, key=lambda c: c["calib_delta"])
        rec = _recommendation(best, fit, trusted)
        theory_pick = min(menu, key=lambda c: c["predicted"]["delta"])

        measured = []
        if not cfg.quick:
            extra = [_extra(n, K, d, 3.0) for d in offsets] + diag
            for c in extra:
                p = fit.predict(c["weights"])
                c["predicted"] = {"delta": p.value, "interval": p.to_list()}
            base_t = ev.measure(np.eye(n)[-1], "test")
            for c in menu + extra:
                dl = base_t if c["method"] == "last" else ev.measure(c["weights"], "test")
                delta, se = paired_delta(dl, base_t)
                measured.append(_measured_row(c, delta, se, trusted, len(test_docs)))
                measured[-1]["doc_nll"] = [float(x) for x in dl.nll]  # paired comparisons between any two
                bar()
    finally:
        bar.close()

    report = {
        "mode": "quick" if cfg.quick else "full",
        "checkpoints": {"n": n, "steps": steps, "paths": [str(c.path) for c in ckpts]},
        "data": {
            **source,
            "calib": {
                "documents": len(calib_docs),
                "tokens": ev.tokens("calib"),
                "doc_tokens": ev.doc_tokens("calib"),
            },
            "test": {
                "documents": len(test_docs),
                "tokens": ev.tokens("test"),
                "doc_tokens": ev.doc_tokens("test"),
            },
        },
        "lr": {"given": lr is not None, "area": grid.area.tolist(), "lr_ratio": grid.lr_ratio.tolist()},
        "recommendation": rec,
        "theory_pick": {
            "name": theory_pick["name"],
            "weights": _floats(theory_pick["weights"]),
            "predicted_delta": theory_pick["predicted"]["delta"] if trusted else None,
        },
        "fit": {**fit.to_dict(), "trusted": trusted, "problems": problems},
        "extra": {"window": K, "offsets": offsets, "by_offset": {str(d): th for d, th in theory.items()}},
        "calibration": {"losses": cal_losses, **cal_detail},
        "candidates": [
            {
                "name": c["name"],
                "weights": _floats(c["weights"]),
                "calib_delta": c.get("calib_delta"),
                "calib_se": c.get("calib_se"),
                "predicted_delta": c["predicted"]["delta"],
            }
            for c in menu
        ],
        "measured": measured,
        "evaluations": ev.calls,
    }
    if measured:
        _add_alpha_cells(report, measured, offsets)
    report["seconds"] = time.perf_counter() - t0
    return report


def _theory_merges(fit: Theory, theory: dict, n: int, K: int, trusted: bool) -> tuple[list, list]:
    """(candidates, diagnostics): Extra-Merge at each α* (a candidate where identified and |α*| ≤ 3) and
    the theory-optimal weights (a candidate where the fit is trusted and no weight exceeds 10)."""
    own, diag = [], []
    for d, th in theory.items():
        a = th["alpha_star_fit"]
        if math.isfinite(a) and abs(a) <= 10:
            x = {**_extra(n, K, d, a), "name": f"Extra K={K} d={d} alpha*={a:.3g}", "group": "alpha*"}
            (own if th["identified"] and abs(a) <= 3 else diag).append(x)
    w = fit.optimal_weights()
    if w is not None and np.abs(w).max() < 50:
        x = {"name": "theory-optimal", "method": "custom", "weights": w, "group": "optimal"}
        (own if trusted and np.abs(w).max() <= 10 else diag).append(x)
    return own, diag


def _steps_grid(steps) -> est.Grid:
    """No learning rate given: constant, so the area is proportional to the steps."""
    s = np.asarray(steps, float)
    return est.Grid((s - s[0]) / (s[-1] - s[0]) * (s.size - 1), np.ones(s.size))


def _quick_pool(menu, fit, trusted) -> list[dict]:
    """Quick mode's candidates: the newest checkpoint, SMA K=4, the theory's own merges and the two others
    it ranks best (or a fixed short list when the fit is not trusted)."""
    keep = {"last", "SMA K=4"} | {c["name"] for c in menu if c.get("group") in ("alpha*", "optimal")}
    if trusted:
        ranked = sorted(menu, key=lambda c: fit.predict(c["weights"]).value)
        keep |= set([c["name"] for c in ranked if c["name"] not in keep][:2])
    else:
        keep |= {"SMA K=2", "EMA beta=0.8", "Extra K=4 d=4 alpha=0.5", "Extra K=4 d=4 alpha=1"}
    return [c for c in menu if c["name"] in keep]


def _recommendation(c: dict, fit: Theory, trusted: bool) -> dict:
    p = fit.predict(c["weights"])
    knobs = {k: c[k] for k in ("window", "offset", "alpha", "decay") if k in c}
    return {
        "name": c["name"],
        "method": c["method"],
        "knobs": knobs,
        "weights": _floats(c["weights"]),
        "alpha": c.get("alpha", 0.0 if c["method"] == "sma" else None),
        "offset": c.get("offset"),
        "predicted_delta": p.value if trusted else None,
        "predicted_interval": p.to_list() if trusted else None,
        "identified": trusted,
        "calib_delta": c["calib_delta"],
        "calib_se": c["calib_se"],
        "selected_by": "lowest loss on the calibration half",
    }


def _measured_row(c: dict, delta: float, se: float, trusted: bool, n_docs: int) -> dict:
    from scipy import stats

    lo, hi = c["predicted"]["interval"]
    z = float(stats.t.ppf(0.95, max(n_docs - 1, 1)))  # the measurement's 90% half-width, in s.e.
    row = {
        "name": c["name"],
        "group": c.get("group", c["method"]),
        "weights": _floats(c["weights"]),
        "delta": delta,
        "se": se,
        "predicted": c["predicted"]["delta"] if trusted else None,
        "predicted_interval": [lo, hi] if trusted else None,
    }
    if "alpha" in c:
        row["alpha"] = c["alpha"]
        row["offset"] = c["offset"]
    if trusted and math.isfinite(se):
        # the interval is for the expected gain; the measurement adds its own sampling error (Student t
        # with one degree of freedom fewer than documents, as the clustered s.e. has)
        half = 0.5 * (hi - lo)
        mid = 0.5 * (hi + lo)
        row["covered"] = bool(abs(delta - mid) <= math.hypot(half, z * se))
    return row


def _add_alpha_cells(report: dict, measured: list[dict], offsets) -> None:
    """Per offset d: the measured best α on the α grid (α = 0 is SMA K) next to the theory's α*."""
    K = report["extra"]["window"]
    sma = next((m for m in measured if m["name"] == f"SMA K={K}"), None)
    for d in offsets:
        grid = [
            (m["alpha"], m["delta"], m["se"])
            for m in measured
            if m.get("offset") == d and m["group"] == "extra"
        ]
        if sma is not None:
            grid.append((0.0, sma["delta"], sma["se"]))
        if not grid:
            continue
        a, delta, se = min(grid, key=lambda g: g[1])
        cell = report["extra"]["by_offset"][str(d)]
        cell["measured_best_alpha"] = a
        cell["measured_best_delta"] = delta
        cell["measured_best_se"] = se
        cell["measured_sign"] = _sign(a)
        cell["sign_match"] = cell["sign"] == _sign(a) if cell["identified"] else None


def _floats(w) -> list[float]:
    return [float(x) for x in np.asarray(w, dtype=float)]


class _Bar:
    def __init__(self, enabled: bool):
        import sys

        from tqdm import tqdm

        self._t = tqdm(desc="study", disable=not enabled, leave=False, file=sys.stderr, unit="eval")

    def __call__(self):
        self._t.update()

    def close(self):
        self._t.close()
