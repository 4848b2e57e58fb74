"""Score what the study ships on simulated runs whose population loss is known
(:mod:`extramerge.study.simulated`; driven by ``scripts/study_validation.py``).

For each run, :func:`extramerge.study.choose.choose` decides on the calibration half as it does on real
checkpoints; then, against the *exact population* ΔL of every merge (the expected loss over the document
population of this trajectory's merge, which the intervals are for):

(a) coverage of the 90% intervals of ΔL vs the newest checkpoint and of ΔL vs the best plain calibration
    merge P, over every menu candidate that is not Extra-Merge or is Extra-Merge with |α| ≤ 1 (the
    newest checkpoint is left out of the first, P of the second: their intervals are exactly [0, 0]); a
    "not identified" interval (None) counts as not covered;
(b) |α* − α_opt| per offset d where α* is identified, α_opt the argmin over a fine α grid of the exact
    population loss of ``rivervalley.weights.extra(n, K, d, α)``;
(c) the recommendation's regret: its exact ΔL minus the lowest exact ΔL over the menu;
(d) the theory's own pick: its exact ΔL vs the newest checkpoint, a harm if > 2 test-half paired s.e.;
(e) the gate's false passes: offered theory merges whose exact ΔL exceeds P's by > 2 test-half paired s.e.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from rivervalley import weights as W

from .choose import choose
from .evaluator import paired_delta
from .simulated import SimSpec, simulate_runs

__all__ = ["ALPHA_GRID", "score_run", "run_scenario", "summarize", "table", "figure", "misses"]

ALPHA_GRID = np.round(np.arange(-1.0, 6.0 + 1e-9, 0.01), 2)  # α_opt's search grid


def _covered(iv, truth: float):
    return iv is not None and iv[0] <= truth <= iv[1]


def _scored(c: dict) -> bool:
    return c["method"] != "extra" or abs(c["alpha"]) <= 1


def score_run(run, cfg) -> dict:
    """Run the study's calibration-half decision on one simulated run and score it (one JSON-able row)."""
    n = run.n
    ch = choose(run, run.grid(), n, cfg, lambda: None)
    last = np.eye(n)[-1]
    P = ch.plain_best
    exact = {id(c): run.population_delta(c["weights"]) for c in ch.menu + ch.diag}
    tl = run.measure(last, "test")
    tP = run.measure(P["weights"], "test")
    ex_P = exact[id(P)]
    cands = []
    for c in ch.menu + ch.diag:
        tc = run.measure(c["weights"], "test")
        d_last, se_last = paired_delta(tc, tl)
        d_P, se_P = paired_delta(tc, tP)
        pr = c.get("predicted") or {}
        cands.append(
            {
                "name": c["name"],
                "kind": c["kind"],
                "method": c["method"],
                "alpha": c.get("alpha"),
                "diagnostic": any(c is x for x in ch.diag),
                "offered": c.get("offered"),
                "scored": _scored(c) and not any(c is x for x in ch.diag),
                "is_last": c["method"] == "last",
                "is_plain_best": c is P,
                "exact": exact[id(c)],
                "exact_vs_plain": exact[id(c)] - ex_P,
                "calib_delta": c.get("calib_delta"),
                "predicted": pr.get("delta"),
                "interval": pr.get("interval"),
                "vs_plain": pr.get("vs_plain"),
                "vs_plain_interval": pr.get("vs_plain_interval"),
                "source": pr.get("source"),
                "model_interval": (pr.get("model") or {}).get("interval"),
                "model_vs_plain_interval": (pr.get("model") or {}).get("vs_plain_interval"),
                "test_delta": d_last,
                "test_se": se_last,
                "test_vs_plain": d_P,
                "test_vs_plain_se": se_P,
            }
        )
    for r in cands:
        r["covered"] = _covered(r["interval"], r["exact"])
        r["covered_vs_plain"] = _covered(r["vs_plain_interval"], r["exact_vs_plain"])
        r["model_covered"] = _covered(r["model_interval"], r["exact"])
        r["model_covered_vs_plain"] = _covered(r["model_vs_plain_interval"], r["exact_vs_plain"])
    row_of = {id(c): r for c, r in zip(ch.menu + ch.diag, cands, strict=True)}
    best = min((r for r in cands if not r["diagnostic"]), key=lambda r: r["exact"])
    rec = row_of[id(ch.recommendation)]

    # α_opt per offset from the exact population loss over a fine grid (one batched loss call)
    K = cfg.window
    cells = []
    for d, th in ch.theory.items():
        Wa = np.stack([W.extra(n, K, d, float(a)) for a in ALPHA_GRID])
        L = run.population_losses(Wa)
        a_opt = float(ALPHA_GRID[int(np.argmin(L))])
        a = th["alpha_star"]
        cells.append(
            {
                "offset": d,
                "identified": bool(th["identified"]),
                "alpha_star": a,
                "alpha_star_fit": th["alpha_star_fit"],
                "alpha_opt": a_opt,
                "alpha_opt_at_edge": a_opt in (ALPHA_GRID[0], ALPHA_GRID[-1]),
                "error": abs(a - a_opt) if a is not None else None,
            }
        )

    tp = ch.theory_pick
    pick = row_of[id(tp["candidate"])]
    harm = pick["exact"] > 2 * pick["test_se"] if pick["test_se"] > 0 else pick["exact"] > 1e-12
    false_passes = [
        r["name"]
        for r in cands
        if r["kind"] == "theory"
        and r["offered"]
        and not r["diagnostic"]
        and r["exact_vs_plain"] > 2 * r["test_vs_plain_se"]
    ]
    harms_newest = [
        r["name"]
        for r in cands
        if r["kind"] == "theory" and r["offered"] and not r["diagnostic"] and r["exact"] > 2 * r["test_se"]
    ]
    return {
        "trusted": ch.trusted,
        "problems": ch.problems,
        "gate": ch.gate,
        "plain_best": P["name"],
        "recommendation": rec["name"],
        "recommendation_kind": rec["kind"],
        "rec_exact": rec["exact"],
        "menu_best": best["name"],
        "menu_best_exact": best["exact"],
        "regret": rec["exact"] - best["exact"],
        "regret_se": paired_delta(
            run.measure(ch.recommendation["weights"], "test"),
            run.measure(next(c for c in ch.menu if c["name"] == best["name"])["weights"], "test"),
        )[1],
        "theory_pick": {
            "name": pick["name"],
            "offered": tp["offered"],
            "exact": pick["exact"],
            "test_se": pick["test_se"],
            "harm": bool(tp["offered"] and harm),
            "regret": pick["exact"] - best["exact"],
        },
        "theory_offered": [r["name"] for r in cands if r["kind"] == "theory" and r["offered"]],
        "gate_false_passes": false_passes,
        "gate_harms_vs_newest": harms_newest,
        "alpha": cells,
        "candidates": cands,
    }


def run_scenario(spec: SimSpec, seeds: int, cfg, seed: int = 0) -> dict:
    rows = []
    for i, run in enumerate(simulate_runs(spec, seeds, seed)):
        rows.append({"seed": i, **score_run(run, cfg)})
    out = {"scenario": spec.name, "spec": run.describe(), "seeds": seeds, "runs": rows, **summarize(rows)}
    for row in rows:  # the per-candidate detail is summarised per run (it would weigh megabytes)
        c = [r for r in row.pop("candidates") if r["scored"]]
        row["scored_vs_last"] = [
            sum(r["covered"] for r in c if not r["is_last"]),
            sum(not r["is_last"] for r in c),
        ]
        row["scored_vs_plain"] = [
            sum(r["covered_vs_plain"] for r in c if not r["is_plain_best"]),
            sum(not r["is_plain_best"] for r in c),
        ]
    return out


def _median(x):
    return statistics.median(x) if x else None


def summarize(rows: list[dict]) -> dict:
    """Per-scenario numbers of the table."""
    c = [r for row in rows for r in row["candidates"] if r["scored"]]
    vl = [r for r in c if not r["is_last"]]
    vp = [r for r in c if not r["is_plain_best"]]
    cells = [x for row in rows for x in row["alpha"]]
    ident = [x for x in cells if x["identified"]]
    harms = [row for row in rows if row["theory_pick"]["harm"]]
    return {
        "coverage_vs_last": sum(r["covered"] for r in vl) / len(vl),
        "coverage_vs_last_identified": _ratio([r["covered"] for r in vl if r["interval"] is not None]),
        "not_identified_vs_last": sum(r["interval"] is None for r in vl),
        "intervals_vs_last": len(vl),
        "coverage_vs_plain": sum(r["covered_vs_plain"] for r in vp) / len(vp),
        "coverage_vs_plain_identified": _ratio(
            [r["covered_vs_plain"] for r in vp if r["vs_plain_interval"] is not None]
        ),
        "not_identified_vs_plain": sum(r["vs_plain_interval"] is None for r in vp),
        "intervals_vs_plain": len(vp),
        "median_width_vs_plain": _median(
            [r["vs_plain_interval"][1] - r["vs_plain_interval"][0] for r in vp if r["vs_plain_interval"]]
        ),
        "median_se_vs_plain": _median([r["test_vs_plain_se"] for r in vp]),
        # the model's own intervals (what the study shipped before it used the calibration measurement)
        "model_coverage_vs_last": sum(r["model_covered"] for r in vl) / len(vl),
        "model_coverage_vs_plain": sum(r["model_covered_vs_plain"] for r in vp) / len(vp),
        "model_not_identified_vs_plain": sum(r["model_vs_plain_interval"] is None for r in vp),
        "model_median_width_vs_plain": _median(
            [
                r["model_vs_plain_interval"][1] - r["model_vs_plain_interval"][0]
                for r in vp
                if r["model_vs_plain_interval"]
            ]
        ),
        "trusted": sum(row["trusted"] for row in rows),
        "gate_open": sum(not row["gate"] for row in rows),
        "alpha_cells": len(cells),
        "alpha_identified": len(ident),
        "median_alpha_error": _median([x["error"] for x in ident]),
        "median_regret": _median([row["regret"] for row in rows]),
        "max_regret": max(row["regret"] for row in rows),
        "regret_over_2se": sum(row["regret"] > 2 * row["regret_se"] for row in rows),
        "theory_recommended": sum(row["recommendation_kind"] == "theory" for row in rows),
        "theory_pick_offered": sum(row["theory_pick"]["offered"] for row in rows),
        "theory_pick_harms": len(harms),
        "theory_pick_worst": max(row["theory_pick"]["exact"] for row in rows),
        "theory_offered": sum(len(row["theory_offered"]) for row in rows),
        "gate_false_passes": sum(len(row["gate_false_passes"]) for row in rows),
        "gate_false_passes_vs_newest": sum(len(row["gate_harms_vs_newest"]) for row in rows),
    }


def _ratio(flags):
    return sum(flags) / len(flags) if flags else None


def _f4(x):
    return "–" if x is None else f"{x:.4f}"


def _pct(x):
    return "–" if x is None else f"{x:.0%}"


def table(results: list[dict]) -> str:
    out = [
        "| scenario | cov. vs last (n/a) | cov. vs plain (n/a) | cov. among identified (last / plain) "
        "| trusted / gate open | median \\|α*−α_opt\\| (identified/cells) | median regret (max; > 2 s.e.) "
        "| median width vs plain (median s.e.) | theory recommended | theory_pick offered / harms (worst) "
        "| theory offered / false passes vs plain / vs newest "
        "| the model's own intervals: cov. vs last / vs plain (n/a), median width vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ae = "–" if r["median_alpha_error"] is None else f"{r['median_alpha_error']:.2f}"
        out.append(
            f"| {r['scenario']} | {_pct(r['coverage_vs_last'])} ({r['not_identified_vs_last']}/"
            f"{r['intervals_vs_last']}) | {_pct(r['coverage_vs_plain'])} ({r['not_identified_vs_plain']}/"
            f"{r['intervals_vs_plain']}) | {_pct(r['coverage_vs_last_identified'])} / "
            f"{_pct(r['coverage_vs_plain_identified'])} | {r['trusted']} / {r['gate_open']} of {r['seeds']} "
            f"| {ae} ({r['alpha_identified']}/{r['alpha_cells']}) | {r['median_regret']:.4f} "
            f"({r['max_regret']:.4f}; {r['regret_over_2se']}) | {_f4(r['median_width_vs_plain'])} "
            f"({_f4(r['median_se_vs_plain'])}) | {r['theory_recommended']} "
            f"| {r['theory_pick_offered']} / {r['theory_pick_harms']} ({r['theory_pick_worst']:+.4f}) "
            f"| {r['theory_offered']} / {r['gate_false_passes']} / {r['gate_false_passes_vs_newest']} "
            f"| {_pct(r['model_coverage_vs_last'])} / {_pct(r['model_coverage_vs_plain'])} "
            f"({r['model_not_identified_vs_plain']}) , {_f4(r['model_median_width_vs_plain'])} |"
        )
    return "\n".join(out)


def figure(results: list[dict], path: Path) -> str:
    """Three panels per scenario: interval coverage (target band 85–95%), |α* − α_opt| where identified
    (target ≤ 0.25), and the recommendation's and the theory pick's exact ΔL relative to the menu's best."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rivervalley.common import plotting

    names = [r["scenario"] for r in results]
    x = np.arange(len(names))
    with plotting.applied():
        fig = Figure(figsize=(11, 9), dpi=plotting.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
        ax1.axhspan(0.85, 0.95, color="0.85", label="target 85–95%")
        ax1.plot(x - 0.1, [r["coverage_vs_last"] for r in results], "o", label="vs newest (n/a = miss)")
        ax1.plot(x + 0.1, [r["coverage_vs_plain"] for r in results], "s", label="vs best plain (n/a = miss)")
        for dx, key, m, col in ((-0.1, "last", "o", "C0"), (0.1, "plain", "s", "C1")):
            y = [_nan(r[f"coverage_vs_{key}_identified"]) for r in results]
            ax1.plot(x + dx, y, m, mfc="none", color=col)
        ax1.set_ylim(0, 1.02)
        ax1.set_ylabel("90% interval coverage")
        ax1.set_title("open markers: among identified intervals only", fontsize=8)
        ax1.legend(fontsize=7, loc="lower left")
        for i, r in enumerate(results):
            e = [c["error"] for row in r["runs"] for c in row["alpha"] if c["identified"]]
            jitter = np.random.default_rng(i).uniform(-0.2, 0.2, len(e))
            ax2.plot(i + jitter, e, ".", color="C2", ms=3)
            if e:
                ax2.plot([i - 0.3, i + 0.3], [np.median(e)] * 2, "-", color="k", lw=1.5)
        ax2.axhline(0.25, color="C3", lw=0.8, ls="--", label="target median ≤ 0.25")
        ax2.set_yscale("symlog", linthresh=0.1)
        ax2.set_ylabel("|α* − α_opt| (identified)")
        ax2.legend(fontsize=7)
        for i, r in enumerate(results):
            rg = [row["regret"] for row in r["runs"]]
            tp = [row["theory_pick"]["regret"] for row in r["runs"] if row["theory_pick"]["offered"]]
            j = np.random.default_rng(100 + i)
            ax3.plot(i - 0.12 + j.uniform(-0.08, 0.08, len(rg)), rg, ".", color="C0", ms=3)
            ax3.plot(i + 0.12 + j.uniform(-0.08, 0.08, len(tp)), tp, ".", color="C4", ms=3)
        ax3.plot([], [], ".", color="C0", label="recommendation")
        ax3.plot([], [], ".", color="C4", label="theory_pick (offered)")
        ax3.set_yscale("symlog", linthresh=1e-3)
        ax3.set_ylabel("exact ΔL − menu's best (nats)")
        ax3.legend(fontsize=7)
        ax3.set_xticks(x)
        ax3.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        fig.savefig(path)
    return str(path)


def _nan(v):
    return math.nan if v is None else v


def misses(results: list[dict]) -> list[str]:
    """The scenarios that miss a target of issue 25 item 6, one line each."""
    out = []
    for r in results:
        why = []
        for key, what in (("coverage_vs_last", "vs newest"), ("coverage_vs_plain", "vs best plain")):
            if not 0.85 <= r[key] <= 0.95:
                why.append(f"coverage {what} {r[key]:.0%}")
        ident = r["coverage_vs_last_identified"]
        if ident is not None and ident > 0.95:  # in the band only because "not identified" counts as a miss
            why.append(f"identified intervals over-cover ({ident:.0%} vs newest)")
        if r["median_alpha_error"] is not None and r["median_alpha_error"] > 0.25:
            why.append(f"median |α* − α_opt| {r['median_alpha_error']:.2f}")
        if r["theory_pick_harms"]:
            why.append(f"theory_pick harms in {r['theory_pick_harms']} of {r['seeds']} runs")
        if why:
            out.append(f"- {r['scenario']}: " + "; ".join(why))
    return out
