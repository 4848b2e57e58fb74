"""The late-stage map: its table, its two figures and the pre-registered targets, from the measured cells.

    python scripts/late_map.py [results/late]

Reads RESULTS/measured/<run>/<phase>-s<spacing>/study.json (``scripts/late_study.py measure``) and writes
RESULTS/late_map.md, RESULTS/dose_response.png (best α against spacing, predicted and measured, per run)
and RESULTS/calibration.png (predicted against measured ΔL, every merge of every cell, with intervals).
Every paired s.e. between two merges is recomputed from the per-document NLL each study.json holds. The
targets are the issue "Late-stage evidence, pre-registered"'s, scored per cell (run, phase, spacing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from extramerge.study.evaluator import DocLosses, paired_delta
from extramerge.study.theory import sign_class

NARROW = 0.05  # intervals narrower than this (nats) are scored for coverage


def load(root: Path) -> list[dict]:
    cells = []
    for p in sorted((root / "measured").glob("*/*/study.json")):
        r = json.loads(p.read_text())
        phase, s = p.parent.name.rsplit("-s", 1)
        r["_run"], r["_phase"], r["_s"] = p.parent.parent.name, phase, int(s)
        cells.append(r)
    return sorted(cells, key=lambda r: (r["_run"], r["_phase"] != "constant", r["_s"]))


def gap(r, a, b) -> tuple[float, float]:
    """Measured ΔL(a) − ΔL(b) on the measurement half and its paired s.e."""
    tok = np.asarray(r["data"]["test"]["doc_tokens"], dtype=float)
    return paired_delta(DocLosses(np.asarray(a["doc_nll"]), tok), DocLosses(np.asarray(b["doc_nll"]), tok))


def alpha_grid(r, d: int) -> list[dict]:
    """The measured plain Extra-Merge rows at offset d on the calibration grid, and SMA K (α = 0)."""
    K = r["extra"]["window"]
    rows = [
        m
        for m in r["measured"]
        if m.get("offset") == d and m["group"] == "extra" and m["kind"] == "plain" and m["alpha"] <= 2
    ]
    sma = next((m for m in r["measured"] if m["name"] == f"SMA K={K}"), None)
    return rows + ([{**sma, "alpha": 0.0}] if sma else [])


def alpha_cell(r, d: int) -> dict:
    """Per offset: the measured best α, whether its sign class is resolved (its best beats the best of every
    other class by ≥ 2 paired s.e.), and the theory's α*."""
    th = r["extra"]["by_offset"][str(d)]
    grid = alpha_grid(r, d)
    best = min(grid, key=lambda m: m["delta"])
    cls = sign_class(best["alpha"])
    resolved = True
    for other in {sign_class(m["alpha"]) for m in grid} - {cls}:
        rival = min((m for m in grid if sign_class(m["alpha"]) == other), key=lambda m: m["delta"])
        g, se = gap(r, rival, best)
        resolved &= g >= 2 * se
    a_star = th["alpha_star"] if th["identified"] else None
    return {
        "d": d,
        "best_alpha": best["alpha"],
        "best": best,
        "resolved": resolved,
        "alpha_star": a_star,
        "sign_ok": None if a_star is None else sign_class(a_star) == cls,
        "close": None if a_star is None else abs(a_star - best["alpha"]) <= 0.25,
    }


def cell_summary(r) -> dict:
    meas = {m["name"]: m for m in r["measured"]}
    best = min(r["measured"], key=lambda m: m["delta"])
    rec = meas[r["recommendation"]["name"]]
    pick = meas[r["theory_pick"]["name"]]
    plain = meas[r["plain_best"]["name"]]
    g, g_se = gap(r, rec, best)
    narrow = [
        m
        for m in r["measured"]
        if m["name"] != "last"
        and m["predicted_interval"] is not None
        and m["predicted_interval"][1] - m["predicted_interval"][0] < NARROW
    ]
    cov = [m["covered"] for m in narrow]
    fc = r.get("forecast") or {}
    fm = fc.get("measured")
    # the calibration-chosen α > 0 merge against the best measured α ≤ 0 / SMA / EMA / WMA / trend / last
    calib = {c["name"]: c["calib_delta"] for c in r["candidates"] if c.get("calib_delta") is not None}
    pos = [m for m in r["measured"] if m["group"] == "extra" and m["kind"] == "plain" and m["alpha"] > 0]
    pos = [m for m in pos if m["name"] in calib]
    chosen = min(pos, key=lambda m: calib[m["name"]]) if pos else None
    rest = [
        m
        for m in r["measured"]
        if m["kind"] == "plain"
        and not (m["group"] == "extra" and m["alpha"] > 0)
        and m["group"] != "forecast"
    ]
    rival = min(rest, key=lambda m: m["delta"])
    pg = gap(r, chosen, rival) if chosen else (float("nan"), float("nan"))
    return {
        "best": best,
        "rec": rec,
        "pick": pick,
        "plain": plain,
        "gap": (g, g_se),
        "rec_ok": g <= g_se + 1e-12,
        "pick_safe": pick["delta"] <= 2 * pick["se"] + 1e-12,
        "cov": (sum(cov), len(cov)),
        "fc_ok": None if not fm else fm["gap_to_best"] <= fm["gap_se"] + 1e-12,
        "fc": fc,
        "pos": chosen,
        "pos_rival": rival,
        "pos_gap": pg,
        "pos_wins": bool(chosen) and pg[0] <= -2 * pg[1],
        "alpha": [alpha_cell(r, d) for d in r["extra"]["offsets"]],
        "tvp": r["theory_vs_plain"],
    }


def _pm(x) -> str:
    return f"{x[0]:+.4f} ± {x[1]:.4f}"


def table(cells, S) -> str:
    lines = [
        "| run | phase | s | d | measured best α (ΔL ± s.e.) | resolved | α* | sign "
        "| recommended (ΔL ± s.e.) | gap to best | best plain (calibration) | theory − plain "
        "| theory_pick (ΔL ± s.e.) "
        "| coverage (< 0.05) | forecast: chosen, gap to best | α > 0 (calibration-chosen) − best other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, s in zip(cells, S, strict=True):
        tvp = s["tvp"]
        tvp_s = (
            "not offered" if tvp["delta"] is None else f"{tvp['theory']}: {_pm((tvp['delta'], tvp['se']))}"
        )
        fc = s["fc"]
        fc_s = (
            "-"
            if not fc.get("measured")
            else (f"{fc['applied']}, {_pm((fc['measured']['gap_to_best'], fc['measured']['gap_se']))}")
        )
        pos_s = (
            "-" if s["pos"] is None else f"{s['pos']['name']} − {s['pos_rival']['name']}: {_pm(s['pos_gap'])}"
        )
        for i, a in enumerate(s["alpha"]):
            head = f"| {r['_run']} | {r['_phase']} | {r['_s']} |" if i == 0 else "| | | |"
            star = "not identified" if a["alpha_star"] is None else f"{a['alpha_star']:+.2f}"
            sign = "-" if a["sign_ok"] is None else ("yes" if a["sign_ok"] else "**no**")
            b = a["best"]
            rec, pick = s["rec"], s["pick"]
            tail = (
                f"{rec['name']} ({_pm((rec['delta'], rec['se']))}) | {_pm(s['gap'])} | "
                f"{s['plain']['name']} | {tvp_s} | {pick['name']} ({_pm((pick['delta'], pick['se']))}) | "
                f"{s['cov'][0]}/{s['cov'][1]} | {fc_s} | {pos_s} |"
                if i == 0
                else " ".join(["|"] * 8)
            )
            lines.append(
                f"{head} {a['d']} | {a['best_alpha']:+g} ({_pm((b['delta'], b['se']))}) | "
                f"{'yes' if a['resolved'] else 'no'} | {star} | {sign} | {tail}"
            )
    return "\n".join(lines)


def targets(cells, S) -> list[tuple[str, str, bool]]:
    A = [a for s in S for a in s["alpha"]]
    res = [a for a in A if a["resolved"] and a["sign_ok"] is not None]
    ident = [a for a in A if a["close"] is not None]
    cov_ok = [s["cov"][0] >= 0.8 * s["cov"][1] for s in S if s["cov"][1]]
    fc = [s["fc_ok"] for s in S if s["fc_ok"] is not None]
    n = len(S)

    def rate(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return [
        (
            "α*'s sign class right in ≥ 85% of the cells the measurement resolves at ≥ 2 paired s.e.",
            f"{sum(a['sign_ok'] for a in res)} of {len(res)}",
            bool(res) and rate([a["sign_ok"] for a in res]) >= 0.85,
        ),
        (
            "|α* − measured best α| ≤ 0.25 in ≥ 70% of identified cells",
            f"{sum(a['close'] for a in ident)} of {len(ident)}",
            bool(ident) and rate([a["close"] for a in ident]) >= 0.7,
        ),
        (
            "theory_pick never worse than the newest checkpoint by > 2 paired s.e.",
            f"{sum(s['pick_safe'] for s in S)} of {n}",
            all(s["pick_safe"] for s in S),
        ),
        (
            "90% intervals narrower than 0.05 nats cover ≥ 80% in every (run, phase, spacing)",
            f"{sum(cov_ok)} of {len(cov_ok)} cells",
            bool(cov_ok) and all(cov_ok),
        ),
        (
            "the recommended merge within 1 paired s.e. of the measured best in ≥ 80% of cells",
            f"{sum(s['rec_ok'] for s in S)} of {n}",
            rate([s["rec_ok"] for s in S]) >= 0.8,
        ),
        (
            "forecast from the first half: its merge within 1 paired s.e. of the measured best in ≥ 70%",
            f"{sum(fc)} of {len(fc)}",
            bool(fc) and rate(fc) >= 0.7,
        ),
    ]


def growth(cells, S) -> list[str]:
    """Per run, phase and d: the measured best α at each spacing, and its rank correlation with spacing."""
    from scipy import stats

    out = [
        "| run | phase | d | best α at s = 100 / 200 / 400 / 800 | Spearman ρ(s, α) | α* at each s |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["_run"], r["_phase"]) for r in cells}, key=lambda k: (k[0], k[1] != "constant"))
    for run, phase in keys:
        mine = [
            (r["_s"], s) for r, s in zip(cells, S, strict=True) if r["_run"] == run and r["_phase"] == phase
        ]
        mine.sort(key=lambda x: x[0])
        for d in sorted({a["d"] for _, s in mine for a in s["alpha"]}):
            pts = [(sp, a) for sp, s in mine for a in s["alpha"] if a["d"] == d]
            xs = [sp for sp, _ in pts]
            ys = [a["best_alpha"] for _, a in pts]
            rho = stats.spearmanr(xs, ys).statistic if len(set(ys)) > 1 and len(xs) > 2 else float("nan")
            stars = " / ".join(
                "n.i." if a["alpha_star"] is None else f"{a['alpha_star']:+.2f}" for _, a in pts
            )
            out.append(
                f"| {run} | {phase} | {d} | {' / '.join(f'{y:+g}' for y in ys)} | {rho:+.2f} | {stars} |"
            )
    return out


def dose_figure(cells, S, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    phases = ["constant", "decay"]
    ds = sorted({a["d"] for s in S for a in s["alpha"]})
    runs = sorted({r["_run"] for r in cells})
    fig = Figure(figsize=(3.2 * len(ds), 5.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(ds), squeeze=False, sharey=True)
    for i, ph in enumerate(phases):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for k, run in enumerate(runs):
                pts = sorted(
                    (r["_s"], a)
                    for r, s in zip(cells, S, strict=True)
                    if r["_run"] == run and r["_phase"] == ph
                    for a in s["alpha"]
                    if a["d"] == d
                )
                if not pts:
                    continue
                xs = [p[0] * (1 + 0.04 * (k - 1.5)) for p in pts]
                ax.plot(
                    xs,
                    [p[1]["best_alpha"] for p in pts],
                    "o-",
                    color=f"C{k}",
                    ms=4,
                    lw=1,
                    label=f"{run} measured" if i == j == 0 else None,
                )
                star = [
                    (x, p[1]["alpha_star"])
                    for x, p in zip(xs, pts, strict=True)
                    if p[1]["alpha_star"] is not None
                ]
                if star:
                    ax.plot(
                        *zip(*star, strict=True),
                        "x--",
                        color=f"C{k}",
                        ms=6,
                        lw=0.8,
                        label=f"{run} α*" if i == j == 0 else None,
                    )
            ax.axhline(0, color="0.6", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks([100, 200, 400, 800], ["100", "200", "400", "800"], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{ph}, d={d}", fontsize=8)
            if i == 1:
                ax.set_xlabel("spacing s (steps)", fontsize=8)
            if j == 0:
                ax.set_ylabel("best α", fontsize=8)
    fig.legend(fontsize=6, loc="lower center", ncol=4)
    fig.suptitle(
        "Extra-Merge K=4: measured best α (o) and predicted α* (x) against checkpoint spacing", fontsize=9
    )
    fig.subplots_adjust(bottom=0.2, hspace=0.35)
    fig.savefig(path)


def calibration_figure(cells, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for src, color in (("calibration", "C0"), ("model", "C3")):
        rows = [
            m
            for r in cells
            for m in r["measured"]
            if m["name"] != "last"
            and m["predicted_interval"] is not None
            and m.get("prediction_source") == src
        ]
        if not rows:
            continue
        x = np.array([m["predicted"] for m in rows])
        y = np.array([m["delta"] for m in rows])
        xe = np.array(
            [
                [m["predicted"] - m["predicted_interval"][0], m["predicted_interval"][1] - m["predicted"]]
                for m in rows
            ]
        ).T
        ye = 1.645 * np.array([m["se"] for m in rows])
        ax.errorbar(
            x,
            y,
            xerr=xe,
            yerr=ye,
            fmt="o",
            ms=2,
            lw=0.4,
            color=color,
            alpha=0.6,
            label=f"predicted by the {src} ({len(rows)})",
        )
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8)
    ax.set_xlabel("predicted ΔL vs the newest checkpoint (90% interval)")
    ax.set_ylabel("measured ΔL (± 90%)")
    ax.set_title("Every merge of every cell: predicted against measured", fontsize=9)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.16)
    fig.savefig(path)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/late")
    cells = load(root)
    if not cells:
        print(f"{root}/measured: no study.json", file=sys.stderr)
        return 2
    S = [cell_summary(r) for r in cells]
    tl = ["| target | measured | met |", "|---|---|---|"]
    tl += [f"| {a} | {b} | {'yes' if c else '**no**'} |" for a, b, c in targets(cells, S)]
    wins = [(r, s) for r, s in zip(cells, S, strict=True) if s["pos_wins"]]
    pos = (
        f"The calibration-chosen α > 0 merge beat the best measured α ≤ 0 / SMA / EMA / WMA / trend merge by "
        f"≥ 2 paired s.e. in {len(wins)} of {len(cells)} cells"
        + (
            ": " + ", ".join(f"{r['_run']} {r['_phase']} s={r['_s']}" for r, _ in wins)
            if wins
            else ": not reproduced at this scale"
        )
        + "."
    )
    text = (
        "\n\n".join(
            [
                "# Late-stage map (pre-registered)",
                f"`python scripts/late_map.py {root}` — {len(cells)} cells.",
                "## Targets\n\n" + "\n".join(tl),
                "## Extrapolation past the average\n\n" + pos,
                "## Best α against spacing\n\n" + "\n".join(growth(cells, S)),
                "## Cells\n\n" + table(cells, S),
            ]
        )
        + "\n"
    )
    (root / "late_map.md").write_text(text)
    dose_figure(cells, S, root / "dose_response.png")
    calibration_figure(cells, root / "calibration.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
