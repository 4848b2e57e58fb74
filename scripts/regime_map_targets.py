"""The regime map: its table, its figure, and the issue's targets, from the committed study reports.

    python scripts/regime_map_targets.py [results/regime]

Reads RESULTS/<run>/study.json (full studies) and study-quick.json (quick ones); writes RESULTS/regime_map.md
and RESULTS/regime_map.png and prints both the table and every target with its measured value and whether
it is met. The targets are the issue "The theory earns its place in the study"'s, scored on what each
study.json holds (per-document NLL: every paired s.e. is recomputed here).
"""

import json
import sys
from pathlib import Path

import numpy as np

from extramerge.study.evaluator import DocLosses, paired_delta

ALPHA_MAX = 1.0  # interval coverage is scored on merges with α ≤ 1 (and every non-extrapolating merge)
NEAR_BEST = 0.01  # "merges within 0.01 nats of the best" for the interval-width target


def load(root: Path):
    runs = []
    for p in sorted(root.glob("*/study.json")):
        r = json.loads(p.read_text())
        q = p.with_name("study-quick.json")
        r["_name"] = p.parent.name
        r["_quick"] = json.loads(q.read_text()) if q.is_file() else None
        runs.append(r)
    return runs


def _dl(m, tok):
    return DocLosses(np.asarray(m["doc_nll"]), np.asarray(tok, dtype=float))


def gap(r, a, b):
    """Measured ΔL(a) − ΔL(b) on the measurement half and its paired s.e."""
    tok = r["data"]["test"]["doc_tokens"]
    return paired_delta(_dl(a, tok), _dl(b, tok))


def scored(r):
    """The merges whose intervals are scored: α ≤ ALPHA_MAX, not the newest checkpoint itself."""
    return [m for m in r["measured"] if m["name"] != "last" and m.get("alpha", 0.0) <= ALPHA_MAX]


def run_summary(r) -> dict:
    meas = {m["name"]: m for m in r["measured"]}
    rec = meas[r["recommendation"]["name"]]
    best = min(r["measured"], key=lambda m: m["delta"])
    plain = meas[r["plain_best"]["name"]]
    pick = meas[r["theory_pick"]["name"]]
    g, g_se = gap(r, rec, best)
    rows = scored(r)
    cov = [m["covered"] for m in rows if m.get("covered") is not None]
    cov_p = [m["covered_vs_plain"] for m in rows if m.get("covered_vs_plain") is not None]
    near = [
        m for m in r["measured"] if m["delta"] <= best["delta"] + NEAR_BEST and m["name"] != plain["name"]
    ]
    widths = [
        m["predicted_vs_plain_interval"][1] - m["predicted_vs_plain_interval"][0]
        for m in near
        if m.get("predicted_vs_plain_interval") is not None
    ]
    ses = [m["se_vs_plain"] for m in near if m["se_vs_plain"] > 0]
    tvp = r["theory_vs_plain"]
    return {
        "rec": rec,
        "best": best,
        "plain": plain,
        "pick": pick,
        "gap": g,
        "gap_se": g_se,
        "rec_ok": g <= g_se + 1e-12,
        "rec_safe": rec["delta"] <= 2 * rec["se"] + 1e-12,
        "rec_interval_ok": not (
            r["recommendation"]["predicted_interval"] is not None
            and r["recommendation"]["name"] != "last"
            and r["recommendation"]["predicted_interval"][0] > 0
        ),
        "pick_safe": pick["delta"] <= 2 * pick["se"] + 1e-12,
        "cov": (sum(cov), len(cov), sum(1 for m in rows if m.get("covered") is None)),
        "cov_p": (sum(cov_p), len(cov_p), sum(1 for m in rows if m.get("covered_vs_plain") is None)),
        "width": float(np.median(widths)) if widths else float("nan"),
        "near_se": float(np.median(ses)) if ses else float("nan"),
        "theory_wins": tvp["delta"] is not None and tvp["delta"] < -2 * tvp["se"],
        "tvp": tvp,
    }


def _pm(d, se) -> str:
    return f"{d:+.4f} ± {se:.4f}"


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/regime")
    runs = load(root)
    if not runs:
        print(f"{root}: no study.json", file=sys.stderr)
        return 2
    lines = [
        "| run | d | measured best α (ΔL ± s.e.) | predicted α* | sign "
        "| recommended (kind; measured ΔL ± s.e.) "
        "| best measured | gap to best ± paired s.e. | best plain (calibration) | theory − plain "
        "| theory_pick (measured ΔL ± s.e.) | coverage vs newest / vs plain (α ≤ 1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells, S = [], []
    for r in runs:
        s = run_summary(r)
        S.append(s)
        tvp = s["tvp"]
        tvp_s = "not offered" if tvp["delta"] is None else f"{tvp['theory']}: {_pm(tvp['delta'], tvp['se'])}"
        pick = s["pick"]
        pick_s = f"{pick['name']} ({_pm(pick['delta'], pick['se'])})" + (
            "" if r["theory_pick"]["offered"] else ", gate closed"
        )
        first = True
        for d, c in r["extra"]["by_offset"].items():
            if "measured_best_alpha" not in c:
                continue
            cells.append(c)
            a = "not identified" if c["alpha_star"] is None else f"{c['alpha_star']:+.2f}"
            sign = "-" if c["sign_match"] is None else ("yes" if c["sign_match"] else "**no**")
            rec = s["rec"]
            tail = (
                f"{rec['name']} ({rec['kind']}; {_pm(rec['delta'], rec['se'])}) | "
                f"{s['best']['name']} ({s['best']['delta']:+.4f}) | {_pm(s['gap'], s['gap_se'])} | "
                f"{s['plain']['name']} ({_pm(s['plain']['delta'], s['plain']['se'])}) | {tvp_s} | {pick_s} | "
                f"{s['cov'][0]}/{s['cov'][1]} / {s['cov_p'][0]}/{s['cov_p'][1]}"
                if first
                else " | | | | | |"
            )
            lines.append(
                f"| {r['_name'] if first else ''} | {d} | {c['measured_best_alpha']:+g} "
                f"({_pm(c['measured_best_delta'], c['measured_best_se'])}) | {a} | {sign} | {tail} |"
            )
            first = False
    table = "\n".join(lines)

    ident = [c for c in cells if c["identified"]]
    sign_rate = sum(c["sign_match"] for c in ident) / len(ident) if ident else float("nan")
    nruns = len(runs)
    cov_runs = [s["cov"][0] / s["cov"][1] >= 0.8 for s in S if s["cov"][1]]
    covp_runs = [s["cov_p"][0] / s["cov_p"][1] >= 0.8 for s in S if s["cov_p"][1]]
    width_ok = [
        s["width"] <= 3 * s["near_se"] for s in S if np.isfinite(s["width"]) and np.isfinite(s["near_se"])
    ]
    wins = sum(s["theory_wins"] for s in S)
    offered = sum(s["tvp"]["delta"] is not None for s in S)
    quick_keep = []
    for r in runs:
        rec = r["recommendation"]
        if r["_quick"] is not None and rec["method"] == "extra" and (rec["alpha"] or 0) > 0:
            q = r["_quick"]["recommendation"]
            quick_keep.append(q["method"] == "extra" and (q["alpha"] or 0) > 0)
    targets = [
        (
            "α* sign matches the measured best α where identified (≥ 85%)",
            f"{sign_rate:.0%} of {len(ident)}",
            sign_rate >= 0.85,
        ),
        (
            "recommended within one paired s.e. of the test-best merge (≥ 80% of runs)",
            f"{np.mean([s['rec_ok'] for s in S]):.0%} of {nruns}",
            np.mean([s["rec_ok"] for s in S]) >= 0.8,
        ),
        (
            "recommended never worse than the newest checkpoint by > 2 s.e.",
            f"{sum(s['rec_safe'] for s in S)} of {nruns}",
            all(s["rec_safe"] for s in S),
        ),
        (
            "no recommendation whose own predicted interval lies entirely above 0",
            f"{sum(s['rec_interval_ok'] for s in S)} of {nruns}",
            all(s["rec_interval_ok"] for s in S),
        ),
        (
            "theory_pick never worse than the newest checkpoint by > 2 paired s.e.",
            f"{sum(s['pick_safe'] for s in S)} of {nruns}",
            all(s["pick_safe"] for s in S),
        ),
        (
            "90% intervals vs the newest checkpoint cover ≥ 80% in every run "
            "(α ≤ 1; not identified excluded)",
            f"{sum(cov_runs)} of {len(cov_runs)} runs",
            bool(cov_runs) and all(cov_runs),
        ),
        (
            "90% intervals vs the best plain merge cover ≥ 80% in every run (α ≤ 1; not identified excluded)",
            f"{sum(covp_runs)} of {len(covp_runs)} runs",
            bool(covp_runs) and all(covp_runs),
        ),
        (
            f"merges within {NEAR_BEST} of the best: median interval width (vs plain) "
            "≤ 3× median paired s.e.",
            f"{sum(width_ok)} of {len(width_ok)} runs",
            bool(width_ok) and all(width_ok),
        ),
        (
            "theory candidates beat the best plain one by ≥ 2 paired s.e. (in ≥ 2 runs, else the theory does "
            "not improve the pick at this scale)",
            f"{wins} of {nruns} runs ({offered} with a theory merge offered)",
            wins >= 2,
        ),
    ]
    if quick_keep:
        targets.append(
            (
                "--quick keeps the full study's α > 0 recommendation",
                f"{sum(quick_keep)} of {len(quick_keep)}",
                all(quick_keep),
            )
        )
    bench = Path("results/benchmarks/study.json")
    if bench.is_file():  # python -m benchmarks.bench_study: both modes timed on the machine's cores, alone
        b = json.loads(bench.read_text())
        t, q = b["full_s"], b["quick_s"]
        what = f"{b['run']}, {b['checkpoints']} checkpoints, {b['threads']} threads"
        targets.append((f"study of a 16-checkpoint run ({what}) under 3 minutes", f"{t:.0f} s", t < 180))
        targets.append(("--quick at most a third of the full study", f"{q:.0f} s = {q / t:.2f}", q <= t / 3))
    tlines = ["| target | measured | met |", "|---|---|---|"]
    tlines += [f"| {a} | {b} | {'yes' if c else '**no**'} |" for a, b, c in targets]
    wl = [
        "| run | coverage vs newest | vs plain | not identified (vs newest / vs plain) "
        "| median width near the best "
        "| median paired s.e. near the best |",
        "|---|---|---|---|---|---|",
    ]
    for r, s in zip(runs, S, strict=True):
        wl.append(
            f"| {r['_name']} | {s['cov'][0]}/{s['cov'][1]} | {s['cov_p'][0]}/{s['cov_p'][1]} | "
            f"{s['cov'][2]} / {s['cov_p'][2]} | {s['width']:.4f} | {s['near_se']:.4f} |"
        )
    text = "## Regime map\n\n" + table + "\n\n## Intervals\n\n" + "\n".join(wl)
    text += "\n\n## Targets\n\n" + "\n".join(tlines) + "\n"
    text += "\n`python scripts/regime_map_targets.py " + str(root) + "`\n"
    (root / "regime_map.md").write_text(text)
    _figure(runs, root / "regime_map.png")
    print(text)
    return 0


def _figure(runs, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, labels = [], []
    for i, r in enumerate(runs):
        for j, (d, c) in enumerate(r["extra"]["by_offset"].items()):
            if "measured_best_alpha" not in c:
                continue
            x = i + 0.25 * (j - 1)
            ax.plot(
                x,
                c["measured_best_alpha"],
                "o",
                color=f"C{j}",
                ms=6,
                label=f"measured best, d={d}" if i == 0 else None,
            )
            lo, hi = c["alpha_star_range"]
            if c["alpha_star"] is not None:
                ax.plot(
                    x,
                    c["alpha_star"],
                    "x",
                    color=f"C{j}",
                    ms=7,
                    label=f"predicted α*, d={d}" if i == 0 else None,
                )
                ax.vlines(x, max(lo, -1), min(hi, 3), color=f"C{j}", lw=1)
            else:
                ax.plot(x, -0.9, "_", color=f"C{j}", ms=8)
        xs.append(i)
        labels.append(r["_name"])
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("α")
    ax.set_ylim(-1, 3)
    ax.set_title(
        "Extra-Merge K=4: measured best α vs predicted α* (bars: ρ set, leave-one-out; _ = not identified)",
        fontsize=8,
    )
    ax.legend(fontsize=6, ncol=2)
    fig.subplots_adjust(bottom=0.25)
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
