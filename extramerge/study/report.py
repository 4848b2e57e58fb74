"""The study's report: study.md, a terminal summary and the ΔL-versus-α figure."""

from __future__ import annotations

import math

from rivervalley.common import plotting

__all__ = ["markdown", "summary_lines", "alpha_figure", "plan_line"]


def _f(x, spec="+.4f") -> str:
    return "not identified" if x is None else (format(x, spec) if math.isfinite(x) else str(x))


def _iv(iv) -> str:
    return "not identified" if iv is None else f"[{iv[0]:+.4f}, {iv[1]:+.4f}]"


def plan_line(p: dict) -> str:
    """The memory plan (``evaluator.plan``) in one line."""
    from rivervalley.common.formatting import format_bytes

    have = "unknown" if p["available_bytes"] is None else format_bytes(p["available_bytes"])
    stacked, streamed = format_bytes(p["stacked_bytes"]), format_bytes(p["streamed_bytes"])
    return (
        f"{p['checkpoints']} checkpoints x {p['parameters'] / 1e6:.3g}M parameters, held {p['mode']}: about "
        f"{format_bytes(p['bytes'])} of memory ({have} available; stacked {stacked}, streamed {streamed})"
    )


def summary_lines(r: dict) -> list[str]:
    rec = r["recommendation"]
    fit = r["fit"]
    out = [
        f"recommended merge: {rec['name']}  (chosen on the calibration half: ΔL {rec['calib_delta']:+.4f} "
        f"± {rec['calib_se']:.4f})",
        f"  predicted ΔL {_f(rec['predicted_delta'])}, 90% interval {_iv(rec['predicted_interval'])} "
        f"({rec['prediction_source'] or 'not identified'}); the model's: {_f(rec['model_predicted_delta'])} "
        f"{_iv(rec['model_predicted_interval'])}",
    ]
    meas = next((m for m in r.get("measured", []) if m["name"] == rec["name"]), None)
    if meas is not None:
        best = min(r["measured"], key=lambda m: m["delta"])
        out.append(
            f"  measured ΔL {meas['delta']:+.4f} ± {meas['se']:.4f} (best measured: {best['name']}, "
            f"{best['delta']:+.4f} ± {best['se']:.4f})"
        )
    out += _theory_lines(r)
    rho = "identified" if fit["rho_identified"] else "not identified"
    out.append(
        f"fit: slope {fit['slope_per_checkpoint']['value']:.4g}/checkpoint, valley loss "
        f"{fit['valley_loss_newest']['value']:.4g}, ρ {fit['rho']:.2f} "
        f"[{fit['rho_interval'][0]:.2f}, {fit['rho_interval'][1]:.2f}] ({rho})"
    )
    for p in fit["problems"]:
        out.append(f"  not identified: {p}")
    for d, c in r["extra"]["by_offset"].items():
        line = f"  d={d}: α* {_f(c['alpha_star'], '+.3f')}"
        if "measured_best_alpha" in c:
            line += f", measured best α {c['measured_best_alpha']:+g}"
        out.append(line)
    return out


def _theory_lines(r: dict) -> list[str]:
    out = [f"  best plain merge on the calibration half: {r['plain_best']['name']}"]
    tvp = r.get("theory_vs_plain")
    if tvp and tvp["delta"] is not None:
        out.append(
            f"  theory vs plain (measured): {tvp['theory']} minus {tvp['plain']} = {tvp['delta']:+.4f} "
            f"± {tvp['se']:.4f} (paired s.e.)"
        )
    gate = r["theory_gate"]
    if not gate["open"]:
        out.append("  theory merges not offered: " + "; ".join(gate["why_closed"]))
    tp = r["theory_pick"]
    out.append(f"  theory's own pick: {tp['name']}" + ("" if tp["offered"] else " (the gate is closed)"))
    fc = r.get("forecast")
    if fc:
        line = (
            f"forecast from step {fc['from_step']} ({fc['checkpoints']} checkpoints): {fc['chosen']}, "
            f"predicted ΔL {_f(fc['predicted_delta'])}"
        )
        if "measured" in fc:
            m = fc["measured"]
            line += (
                f"; at the newest: {fc['applied']} measured {m['delta']:+.4f} ± {m['se']:.4f}, "
                f"{m['gap_to_best']:+.4f} ± {m['gap_se']:.4f} from the best ({m['best']})"
            )
        out.append(line)
    return out


def _predictions_table(r: dict) -> list[str]:
    """predictions.md: every merge the measurement will measure, with its prediction."""
    reg = r["preregistration"]
    lines = [
        f"Predictions made {reg['predicted_utc']} before the measurement half was read; measure them with "
        "`extramerge study --measure PRED --test FILE -o OUT`.",
        "",
        "| merge | kind | predicted ΔL | 90% interval | source | vs best plain | 90% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["to_measure"]:
        p = m["predicted"]
        lines.append(
            f"| {m['name']} | {m['kind']} | {_f(p['delta'])} | {_iv(p['interval'])} | "
            f"{p.get('source') or '-'} | {_f(p['vs_plain'])} | {_iv(p['vs_plain_interval'])} |"
        )
    return [*lines, ""]


def markdown(r: dict) -> str:
    lines = ["# Extra-Merge study", "", *(f"    {s}" for s in summary_lines(r)), ""]
    d = r["data"]
    steps = r["checkpoints"]["steps"]
    test = (
        f"measurement half {d['test']['documents']} / {d['test']['tokens']}"
        if "test" in d
        else "measurement half not read"
    )
    lines += [
        f"{r['checkpoints']['n']} checkpoints at steps {steps[0]}..{steps[-1]}; calibration half "
        f"{d['calib']['documents']} documents / {d['calib']['tokens']} tokens, {test}; mode {r['mode']}, "
        f"{r['evaluations']} evaluations, {r['seconds']:.0f} s.",
        "",
    ]
    if "to_measure" in r:
        lines += _predictions_table(r)
    if r.get("measured"):
        lines += [
            "| merge | kind | measured ΔL | s.e. | predicted ΔL | 90% interval | covered "
            "| vs best plain: measured | s.e. | predicted | 90% interval | covered |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in r["measured"]:
            cov = {True: "yes", False: "**no**"}.get(m.get("covered"), "-")
            cov_p = {True: "yes", False: "**no**"}.get(m.get("covered_vs_plain"), "-")
            lines.append(
                f"| {m['name']} | {m['kind']} | {m['delta']:+.4f} | {m['se']:.4f} | {_f(m['predicted'])} | "
                f"{_iv(m['predicted_interval'])} | {cov} | {m['delta_vs_plain']:+.4f} | "
                f"{m['se_vs_plain']:.4f} | "
                f"{_f(m['predicted_vs_plain'])} | {_iv(m['predicted_vs_plain_interval'])} | {cov_p} |"
            )
        lines.append("")
    lines += [
        "ΔL: loss minus the newest checkpoint's, nats per token, on the measurement half; s.e. paired, "
        "clustered by document. The interval is for the expected gain; 'covered' also allows the "
        "measurement's own 90% half-width (Student t, documents − 1 degrees of freedom). A merge measured on "
        "the calibration half is predicted by that measurement; the others by the model (study.json keeps "
        "the model's prediction of every merge under 'model'). 'vs best plain': "
        "the same against the plain merge with the lowest calibration ΔL; an interval wider than 0.25 nats "
        "is 'not identified' and not counted as covered. kind: plain (no theory) or theory (the fit's own "
        "merges, offered only through the gate).",
        "",
    ]
    return "\n".join(lines)


def alpha_figure(r: dict, path) -> str | None:
    """ΔL against α per offset d: measured (± 1.645 s.e.) and predicted (line and 90% band)."""
    if not r.get("measured"):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with plotting.applied():  # the one plotting style of both packages
        fig = Figure(figsize=(6.4, 4.2), dpi=plotting.DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        K = r["extra"]["window"]
        sma = next((m for m in r["measured"] if m["name"] == f"SMA K={K}"), None)
        for i, d in enumerate(r["extra"]["offsets"]):
            rows = [m for m in r["measured"] if m.get("offset") == d and m["group"] == "extra"]
            if sma is not None:
                rows.append({**sma, "alpha": 0.0})
            rows.sort(key=lambda m: m["alpha"])
            a = [m["alpha"] for m in rows]
            color = f"C{i}"
            ax.errorbar(
                a,
                [m["delta"] for m in rows],
                yerr=[1.645 * m["se"] for m in rows],
                fmt="o",
                color=color,
                ms=4,
                label=f"measured d={d}",
            )
            if rows[0]["model"]["delta"] is not None:
                ax.plot(a, [m["model"]["delta"] for m in rows], "-", color=color, lw=1, label=f"model d={d}")
                nan = (math.nan, math.nan)  # a not-identified interval leaves a gap in the band
                ax.fill_between(
                    a,
                    [(m["model"]["interval"] or nan)[0] for m in rows],
                    [(m["model"]["interval"] or nan)[1] for m in rows],
                    color=color,
                    alpha=0.12,
                )
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("α")
        ax.set_ylabel("ΔL vs newest checkpoint (nats/token)")
        ax.set_title(f"Extra-Merge K={K}: measured (± 90%) and the model's prediction (band: 90%)")
        ax.legend(fontsize=7)
        fig.savefig(path)
    return str(path)
