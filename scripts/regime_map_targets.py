"""The regime map: its table, its figure, and the issue's targets, from the committed study reports.

    python scripts/regime_map_targets.py [results/regime]

Reads RESULTS/<run>/study.json (full studies), study-quick.json (quick ones) and
results/estimator_validation.json; writes RESULTS/regime_map.md and RESULTS/regime_map.png and prints both
the table and every target with its measured value and whether it is met.
"""

import json
import sys
from pathlib import Path

import numpy as np

from extramerge.study.evaluator import DocLosses, paired_delta

ALPHA_MAX = 2.0  # coverage is scored on merges with α ≤ 2 (and every non-extrapolating merge)


def load(root: Path):
    runs = []
    for p in sorted(root.glob("*/study.json")):
        r = json.loads(p.read_text())
        q = p.with_name("study-quick.json")
        r["_name"] = p.parent.name
        r["_quick"] = json.loads(q.read_text()) if q.is_file() else None
        runs.append(r)
    return runs


def run_rows(r):
    tok = r["data"]["test"]["doc_tokens"]
    meas = {m["name"]: m for m in r["measured"]}
    rec = meas[r["recommendation"]["name"]]
    best = min(r["measured"], key=lambda m: m["delta"])
    n = np.asarray(tok, dtype=float)
    gap, gap_se = paired_delta(
        DocLosses(np.asarray(rec["doc_nll"]), n), DocLosses(np.asarray(best["doc_nll"]), n)
    )
    return rec, best, gap, gap_se


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/regime")
    runs = load(root)
    if not runs:
        print(f"{root}: no study.json", file=sys.stderr)
        return 2
    lines = [
        "| run | d | measured best α (ΔL ± s.e.) | predicted α* | sign | recommended (measured ΔL ± s.e.) "
        "| best measured | gap to best ± paired s.e. | coverage (α ≤ 2) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells, rec_ok, rec_safe, covered, n_cov = [], [], [], 0, 0
    for r in runs:
        rec, best, gap, gap_se = run_rows(r)
        rec_ok.append(gap <= gap_se + 1e-12)
        rec_safe.append(rec["delta"] <= 2 * rec["se"] + 1e-12)
        cov = [
            m["covered"]
            for m in r["measured"]
            if "covered" in m and m["name"] != "last" and m.get("alpha", 0.0) <= ALPHA_MAX
        ]
        covered += sum(cov)
        n_cov += len(cov)
        first = True
        for d, c in r["extra"]["by_offset"].items():
            if "measured_best_alpha" not in c:
                continue
            cells.append(c)
            a = "not identified" if c["alpha_star"] is None else f"{c['alpha_star']:+.2f}"
            sign = "-" if c["sign_match"] is None else ("yes" if c["sign_match"] else "**no**")
            tail = (
                f"{rec['name']} ({rec['delta']:+.4f} ± {rec['se']:.4f}) | "
                f"{best['name']} ({best['delta']:+.4f}) | "
                f"{gap:+.4f} ± {gap_se:.4f} | {sum(cov)}/{len(cov)}"
                if first
                else " | | |"
            )
            lines.append(
                f"| {r['_name'] if first else ''} | {d} | {c['measured_best_alpha']:+g} "
                f"({c['measured_best_delta']:+.4f} "
                f"± {c['measured_best_se']:.4f}) | {a} | {sign} | {tail} |"
            )
            first = False
    table = "\n".join(lines)

    ident = [c for c in cells if c["identified"]]
    sign_rate = sum(c["sign_match"] for c in ident) / len(ident) if ident else float("nan")
    not_ident = 1 - len(ident) / len(cells) if cells else float("nan")
    targets = [
        (
            "α* sign matches the measured best α where identified (≥ 85%)",
            f"{sign_rate:.0%} of {len(ident)}",
            sign_rate >= 0.85,
        ),
        (
            "α* 'not identified' in at most a third of the (run, d) cells",
            f"{not_ident:.0%} of {len(cells)}",
            not_ident <= 1 / 3,
        ),
        (
            "recommended within one paired s.e. of the test-best merge (≥ 80% of runs)",
            f"{np.mean(rec_ok):.0%} of {len(runs)}",
            np.mean(rec_ok) >= 0.8,
        ),
        (
            "recommended never worse than the newest checkpoint by > 2 s.e.",
            f"{np.mean(rec_safe):.0%} of {len(runs)}",
            all(rec_safe),
        ),
        (
            "90% intervals cover the measured ΔL (≥ 80% of merges with α ≤ 2)",
            f"{covered / max(n_cov, 1):.0%} of {n_cov}",
            n_cov > 0 and covered / n_cov >= 0.8,
        ),
    ]
    bench = Path("results/benchmarks/study.json")
    timed = next((r for r in runs if r["checkpoints"]["n"] == 16), None)
    if bench.is_file():  # python -m benchmarks.bench_study: both modes timed on the machine's cores
        b = json.loads(bench.read_text())
        t, q = b["full_s"], b["quick_s"]
        what = f"{b['run']}, {b['checkpoints']} checkpoints, {b['threads']} threads"
        targets.append((f"study of a 16-checkpoint run ({what}) under 3 minutes", f"{t:.0f} s", t < 180))
        targets.append(("--quick at most a third of the full study", f"{q:.0f} s = {q / t:.2f}", q <= t / 3))
    elif timed is not None:
        t = timed["seconds"]
        targets.append(
            (f"study of a 16-checkpoint run ({timed['_name']}) under 3 minutes", f"{t:.0f} s", t < 180)
        )
        if timed["_quick"] is not None:
            q = timed["_quick"]["seconds"]
            targets.append(
                ("--quick at most a third of the full study", f"{q:.0f} s = {q / t:.2f}", q <= t / 3)
            )
    val = Path("results/estimator_validation.json")
    if val.is_file():
        rows = json.loads(val.read_text())
        for key, what in (("slope", "river slope"), ("valley", "valley loss")):
            within = [abs(r[f"{key}_rel_error"]) <= 0.10 for r in rows]
            cov = [0.85 <= r[f"{key}_coverage"] <= 0.95 for r in rows]
            targets.append(
                (
                    f"simulations: {what} within 10% (median)",
                    f"{sum(within)} of {len(rows)} scenarios",
                    all(within),
                )
            )
            targets.append(
                (
                    f"simulations: {what} 90% intervals cover 85-95%",
                    f"{sum(cov)} of {len(rows)} scenarios",
                    all(cov),
                )
            )
    tlines = ["| target | measured | met |", "|---|---|---|"]
    tlines += [f"| {a} | {b} | {'yes' if c else '**no**'} |" for a, b, c in targets]
    text = "## Regime map\n\n" + table + "\n\n## Targets\n\n" + "\n".join(tlines) + "\n"
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
