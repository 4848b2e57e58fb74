"""The toy study: simulate, validate the theory, draw every figure, into one output folder.

    python -m experiments.toy_study [-o out/toy] [--fast]

Stages (each writes into its own subfolder of OUT):
  1. simulate/   one SGD run on a river valley with a power-law valley spectrum (checkpoints .npz); every
                 merge method is scored as a weight vector: ΔL(w) predicted by THEORY §d' versus simulated;
  2. validate/   the formula-versus-simulation table of ``rivervalley validate`` (full grid, or --fast);
  3. figures/    every paper figure of rivervalley.figures (PNG + JSON each).
Ends with a one-screen summary and where the results are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rivervalley import theory, validate
from rivervalley import weights as W
from rivervalley.common.publish import write_file
from rivervalley.figures import run_all
from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.simulate import simulate

# One scenario for stage 1: c, η, s and a power-law valley λ_i = 2/i, i = 1..16 (ηλ from 1.0 down to 0.06).
SCENARIO = dict(slope=0.5, lr=0.5, interval=4)
POWER_LAW, M, N_MERGE = (2.0, 1.0), 16, 16


def _methods(curvatures) -> list[tuple[str, np.ndarray]]:
    kw = dict(curvatures=curvatures, **SCENARIO)
    n = N_MERGE
    last = np.zeros(n)
    last[-1] = 1.0
    K, d = 8, 4
    a_star = float(theory.optimal_alpha(window=K, offset=d, **kw))
    return [
        ("last checkpoint", last),
        (f"SMA K={K}", W.sma(n, K)),
        ("EMA β=0.8", W.ema(n, 0.8)),
        (f"WMA K={K}", W.wma(n, K)),
        (f"Extra-Merge K={K} d={d} α*={a_star:.2f}", W.extra(n, K, d, a_star)),
        (f"theory-optimal N={n}", W.optimal(n, **kw)),
    ]


def stage_simulate(out: Path, *, fast: bool, seed: int = 0) -> dict:
    """Simulate checkpoints (exact path, stationary start); score every merge, predicted vs simulated ΔL."""
    land = QuadraticRiverValley(slope=SCENARIO["slope"], power_law=POWER_LAW, m=M)
    lam = land.curvatures
    seeds, n_ckpts = (64, 200) if fast else (256, 400)
    res = simulate(
        land,
        lr=SCENARIO["lr"],
        seeds=seeds,
        noise=1.0,
        river_noise=0.0,
        ckpt_every=SCENARIO["interval"],
        n_ckpts=n_ckpts,
        init="stationary",
        exact=True,
        seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    X = res.checkpoints.numpy()
    arrays = dict(checkpoints=X, ckpt_steps=res.ckpt_steps, ckpt_loss=res.ckpt_loss.numpy(), curvatures=lam)
    write_file(out / "checkpoints.npz", lambda p: np.savez_compressed(p, **arrays))
    win = np.lib.stride_tricks.sliding_window_view(X, N_MERGE, axis=1)  # [S, windows, p, N]
    last_loss = res.ckpt_loss.numpy()[:, N_MERGE - 1 :]
    rows = []
    for name, w in _methods(lam):
        merged = win @ w
        flat = merged.reshape(-1, merged.shape[-1])
        loss = land.loss(torch.from_numpy(np.ascontiguousarray(flat))).numpy().reshape(merged.shape[:-1])
        per_seed = (loss - last_loss).mean(1)
        mean, se = per_seed.mean(), per_seed.std(ddof=1) / np.sqrt(seeds)
        pred = float(theory.weights_delta_loss(w, curvatures=lam, **SCENARIO))
        rows.append(
            {
                "method": name,
                "lag": float(W.lag(w)),
                "predicted": pred,
                "simulated": float(mean),
                "se": float(se),
                "z": float((mean - pred) / se) if se > 0 else 0.0,
            }
        )
    summary = {
        "scenario": dict(SCENARIO, power_law=POWER_LAW, m=M, n_merge=N_MERGE, seeds=seeds, n_ckpts=n_ckpts),
        "methods": rows,
    }
    text = json.dumps(summary, indent=1, ensure_ascii=False)
    write_file(out / "merges.json", lambda p: p.write_text(text))
    return summary


def stage_validate(out: Path, *, fast: bool, seed: int = 0) -> validate.Report:
    report = validate.run(
        fast=fast, seed=seed, progress=lambda s: print("  " + s, file=sys.stderr, flush=True)
    )
    out.mkdir(parents=True, exist_ok=True)
    name = "validation_fast" if fast else "validation"
    text = json.dumps(report.to_dict(), indent=1, ensure_ascii=False)
    write_file(out / f"{name}.json", lambda p: p.write_text(text))
    write_file(out / f"{name}.txt", lambda p: p.write_text(validate.format_table(report) + "\n"))
    return report


def stage_figures(out: Path, *, fast: bool, seed: int = 0) -> dict:
    return run_all(
        out, quick=fast, seed=seed, progress=lambda s: print("  " + s, file=sys.stderr, flush=True)
    )


def run(out="out/toy", *, fast: bool = False, seed: int = 0) -> dict:
    """Run the three stages into ``out``; returns what they produced and prints the summary."""
    out = Path(out)
    t0 = time.perf_counter()
    times = {}
    print(f"[toy study] 1/3 simulate -> {out / 'simulate'}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    merges = stage_simulate(out / "simulate", fast=fast, seed=seed)
    times["simulate"] = time.perf_counter() - t
    print(
        f"[toy study] 2/3 validate ({'fast' if fast else 'full'} grid) -> {out / 'validate'}",
        file=sys.stderr,
        flush=True,
    )
    t = time.perf_counter()
    report = stage_validate(out / "validate", fast=fast, seed=seed)
    times["validate"] = time.perf_counter() - t
    print(f"[toy study] 3/3 figures -> {out / 'figures'}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    figures = stage_figures(out / "figures", fast=fast, seed=seed)
    times["figures"] = time.perf_counter() - t
    result = {
        "merges": merges,
        "report": report,
        "figures": figures,
        "times": times,
        "wall_s": time.perf_counter() - t0,
        "out": out,
    }
    print(summary(result))
    return result


def summary(result: dict) -> str:
    """One screen: merges predicted vs simulated, the validation verdict, where everything is."""
    rep, out = result["report"], result["out"]
    lines = [
        "",
        "== toy study: river-valley theory vs simulation ==",
        "",
        "Merging the last 16 checkpoints (ΔL = E L(merge) − E L(last), linear river, power-law valley):",
    ]
    width = max(len(r["method"]) for r in result["merges"]["methods"])
    lines.append(f"  {'method':<{width}}  lag   predicted  simulated ± se        z")
    for r in result["merges"]["methods"]:
        lines.append(
            f"  {r['method']:<{width}}  {r['lag']:4.1f}  {r['predicted']:+9.4f}  "
            f"{r['simulated']:+9.4f} ± {r['se']:.4f}  {r['z']:+5.2f}"
        )
    gated = [r for r in rep.rows if r.gated]
    approx = [r for r in rep.rows if r.check == "≈"]
    verdict = "PASSED" if rep.passed else f"FAILED ({len(rep.failures)} rows beyond |z| > {validate.Z_MAX:g})"
    lines += [
        "",
        f"Validation ({'fast' if rep.fast else 'full'} grid): {verdict}: {len(rep.rows)} rows, "
        f"{len(gated)} gated, max |z| on exact rows {rep.max_abs_z:.2f}",
    ]
    for r in rep.failures:
        lines.append(
            f"  FAIL {r.section} {r.quantity} @ {r.scenario}: {r.formula:.5g} vs {r.mean:.5g} ± "
            f"{r.se:.2g} (z={r.z:+.2f})"
        )
    if approx:
        worst = max(approx, key=lambda r: abs(r.mean - r.formula))
        lines.append(
            f"  approximations (not gated): largest bias {worst.mean - worst.formula:+.3f} for "
            f"{worst.quantity}"
        )
    t = result["times"]
    lines += [
        "",
        f"Figures: {', '.join(result['figures'])}",
        f"Time: simulate {t['simulate']:.1f} s, validate {t['validate']:.1f} s, "
        f"figures {t['figures']:.1f} s; total {result['wall_s']:.1f} s",
        "",
        f"Results in {out}/:",
        "  simulate/checkpoints.npz, simulate/merges.json",
        f"  validate/validation{'_fast' if rep.fast else ''}.txt (+ .json)",
        "  figures/*.png (+ the data behind each, *.json)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Toy study: simulate, validate the theory, draw the figures.")
    p.add_argument("-o", "--out", default="out/toy", help="output folder (default out/toy)")
    p.add_argument("--fast", action="store_true", help="fast validation grid and quick figures")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    result = run(args.out, fast=args.fast, seed=args.seed)
    return 0 if result["report"].passed else 1


if __name__ == "__main__":
    sys.exit(main())
