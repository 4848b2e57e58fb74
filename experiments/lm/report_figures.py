"""Figures of the LM study, drawn from the report dict alone (plus the Gram matrix for the PC plane).

alpha.png       measured held-out loss versus α per offset d, with the predicted curves of both fits
fve1.png        FVE₁ versus merge window K: measured, theory §e approximation and lower bound
trajectory.png  PC1–PC2 scores of the raw and SMA-merged trajectories, with the merges the study measured
loss_curve.png  train / validation loss versus step, the checkpoint window shaded, the best merges marked
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from extramerge.plots import _figure, _save
from extramerge.trajectory import project_scores
from rivervalley import weights as W


def draw_all(report: dict, G: np.ndarray, folder: Path) -> list[str]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in (
        ("alpha.png", _alpha),
        ("fve1.png", _fve1),
        ("trajectory.png", lambda r, p: _trajectory(r, G, p)),
        ("loss_curve.png", _loss_curve),
    ):
        path = folder / name
        if fn(report, path) is not False:
            paths.append(str(path))
    return paths


def _alpha(report: dict, path: Path):
    ex = report["extra"]
    curves = ex["curves"]
    fig, ax = _figure(6.4, 4.2, left=0.13, bottom=0.12)
    last = report["methods"][0]["loss"]
    colors = ["C0", "C1", "C2", "C3"]
    for i, d in enumerate(ex["offsets"]):
        c = colors[i % len(colors)]
        pts = [(r["alpha"], r["loss"]) for r in report["methods"] if r["group"] == f"extra d={d}"]
        a, y = zip(*sorted(pts), strict=True)
        ax.plot(a, y, "o", color=c, label=f"measured, d={d}")
        ax.plot(
            curves["alpha"], curves[str(d)]["losses"], "-", color=c, lw=1.4, label=f"theory (ρ losses), d={d}"
        )
        ax.plot(curves["alpha"], curves[str(d)]["geometry"], ":", color=c, lw=1.2)
    ax.axhline(last, color="k", lw=0.8, ls="--", label="last checkpoint")
    ax.set_xlabel("α  (E = M + α(M − M₋d))")
    ax.set_ylabel(f"held-out loss ({report['split']}, nats/byte)")
    ax.set_title(f"Extra-Merge K={ex['window']}: measured vs predicted (dotted: ρ from geometry)", fontsize=9)
    lo = min(r["loss"] for r in report["methods"])
    ax.set_ylim(lo - 0.1 * (last - lo + 1e-3), last + 1.5 * (last - lo + 1e-3))
    ax.legend(fontsize=7)
    _save(fig, path)


def _fve1(report: dict, path: Path):
    r1 = report["rank1"]
    fig, ax = _figure(5.6, 4.0, left=0.13, bottom=0.12)
    ks = [1] + [int(k) for k in r1["merged_fve1"] if k != "1"]
    meas = [r1["raw_fve1"]] + [r1["merged_fve1"][str(k)] for k in ks[1:]]
    ax.plot(ks, meas, "o-", label="measured")
    th = r1["theory_geometric"]
    tk = [k for k in ks if str(k) in th]
    if tk:
        ax.plot(tk, [th[str(k)]["approx"] for k in tk], "s--", label="theory §e (approx.)")
        ax.plot(tk, [th[str(k)]["lower_bound"] for k in tk], "v:", label="theory §e (lower bound)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("SMA window K (1 = raw checkpoints)")
    ax.set_ylabel("FVE₁ (variance share of PC1)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Merged checkpoints fall on a line", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def _trajectory(report: dict, G: np.ndarray, path: Path):
    n = G.shape[0]
    fig, ax = _figure(5.8, 4.6, left=0.13, bottom=0.12)
    raw = project_scores(G, np.eye(n), k=2)
    ax.plot(raw[:, 0], raw[:, 1], "o-", color="0.6", ms=3, lw=0.8, label="raw checkpoints")
    K = max([int(k) for k in report["rank1"]["merged_fve1"] if 1 < int(k) < n] or [1])  # the widest window
    merged = project_scores(G, W.merge_matrix(n, K), k=2)
    ax.plot(merged[:, 0], merged[:, 1], "o-", color="C0", ms=3, label=f"SMA K={K}")
    marks = {}
    for r in report["methods"]:
        g = r["group"].split(" ")[0]
        if g in ("extra", "trend", "pc1", "theory-optimal") and (
            g not in marks or r["loss"] < marks[g]["loss"]
        ):
            marks[g] = r
    for i, r in enumerate(marks.values()):
        p = project_scores(G, np.asarray(r["weights"])[None, :], k=2)[0]
        ax.plot(
            p[0], p[1], "*", ms=11, color=f"C{i + 1}", label=f"{r['name']} (ΔL {r['delta_measured']:+.3f})"
        )
    ax.plot(raw[-1, 0], raw[-1, 1], "ks", ms=6, label="last")
    ax.set_xlabel("PC1 (direction of travel)")
    ax.set_ylabel("PC2")
    ax.set_title("Trajectory in the PC1–PC2 plane", fontsize=10)
    ax.legend(fontsize=6.5)
    _save(fig, path)


def _loss_curve(report: dict, path: Path):
    log = report.get("log")
    if not log or not Path(log).is_file():
        return False
    train, val = [], []
    for line in Path(log).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_loss" in rec:
            train.append((rec["step"], rec["train_loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    if not train:
        return False
    fig, ax = _figure(6.4, 4.0, left=0.12, bottom=0.12)
    s, y = np.array(train).T
    k = max(1, len(y) // 100)
    if k > 1:  # moving average for readability
        y = np.convolve(y, np.ones(k) / k, mode="valid")
        s = s[k - 1 :]
    ax.plot(s, y, color="0.55", lw=0.8, label="train (smoothed)")
    if val:
        vs, vy = np.array(val).T
        ax.plot(vs, vy, "o-", color="C0", ms=2.5, lw=1, label="validation")
    steps = report["checkpoints"]["steps"]
    ax.axvspan(steps[0], steps[-1], color="C1", alpha=0.12, label="checkpoint window")
    best = report["summary"]["best"]
    for i, g in enumerate(("last", "sma", "extra", "trend")):
        if g in best:
            ax.axhline(
                best[g]["loss"],
                color=f"C{i + 2}",
                lw=0.9,
                ls="--",
                label=f"{best[g]['name']} ({report['split']})",
            )
    lo = min(b["loss"] for b in best.values())
    ax.set_ylim(lo - 0.15, max(lo + 1.5, min(y.max(), lo + 4)))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("Loss curve with the merges marked", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
