"""``rivervalley``: validate the theory against simulation, run the simulator, draw the figures.

    rivervalley validate [--fast] [--json PATH] [--seeds N] [--seed S] [--only STUDY ...] [-o DIR]
                         [--noise-backend {torch,native}]
    rivervalley simulate [--curvatures 1,0.1 | --power-law 1,1 --m 20] [--optimizer sgd] [--lr 0.1] ... -o DIR
    rivervalley figures -o DIR [--only NAME ...] [--quick]

The demo is ``python -m experiments.demo`` (``make demo``).

Bad parameters print one line on stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rivervalley.common import cli as commandline
from rivervalley.common.formatting import jsonable
from rivervalley.common.publish import claim_file, claim_folder, mark, write_file

__all__ = ["main", "build_parser"]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    vals = _floats(text)
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return vals[0], vals[1]


def _shape(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 8,16, got {text!r}") from None
    return a, b


# ---------------------------------------------------------------------------------------------------------
# validate


def _is_validation_report(path: Path) -> bool:
    """Whether ``path`` holds a report ``rivervalley validate`` wrote (recognised by its content)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(64 * 2**20))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"passed", "z_max", "n_rows", "rows"} <= doc.keys()


def _cmd_validate(args) -> int:
    from rivervalley import validate

    out = Path(args.out)
    json_path = (
        Path(args.json) if args.json else out / ("validation_fast.json" if args.fast else "validation.json")
    )
    claim_file(json_path, args.force, _is_validation_report)  # before the run, not after it
    txt_path = json_path.with_suffix(".txt")
    claim_file(txt_path, args.force, lambda p: _is_validation_report(p.with_suffix(".json")))
    report = validate.run(
        fast=args.fast,
        seeds=args.seeds,
        seed=args.seed,
        only=args.only,
        progress=None if args.quiet else lambda s: print(s, file=sys.stderr, flush=True),
        noise_backend=args.noise_backend,
    )
    table = validate.format_table(report)
    print(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report.to_dict(), indent=1, ensure_ascii=False)
    write_file(json_path, lambda p: p.write_text(text))
    write_file(json_path.with_suffix(".txt"), lambda p: p.write_text(table + "\n"))
    print(f"wrote {json_path} and {json_path.with_suffix('.txt')}")
    if not report.passed:
        print(
            f"validation FAILED: {len(report.failures)} row(s) beyond |z| > {validate.Z_MAX:g}",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# simulate


def _landscape_from_args(args):
    from rivervalley.landscapes import MatrixLeastSquares, QuadraticRiverValley

    if args.landscape == "matrix":
        if args.shape is None:
            raise ValueError("--landscape matrix needs --shape A,B")
        return MatrixLeastSquares(
            a=args.shape[0],
            b=args.shape[1],
            slope=args.slope,
            river_curvature=args.river_curvature or None,
            seed=args.seed,
        )
    return QuadraticRiverValley(
        slope=args.slope,
        river_curvature=args.river_curvature,
        curvatures=args.curvatures,
        m=args.m,
        power_law=args.power_law,
        rotate=args.rotate,
        seed=args.seed,
    )


def _optimizer_from_args(args, landscape):
    from rivervalley.optimizers import get_optimizer

    name = args.optimizer.lower()
    if name == "sgd":
        return get_optimizer(
            "sgd", momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay
        )
    if name in ("adam", "adamw"):
        return get_optimizer(name, weight_decay=args.weight_decay)
    if name == "muon":
        shape = getattr(landscape, "shape", None)
        if shape is None:
            raise ValueError("--optimizer muon needs a matrix landscape (--landscape matrix --shape A,B)")
        return get_optimizer("muon", shape=shape, weight_decay=args.weight_decay)
    raise ValueError(f"--optimizer must be one of sgd, adam, adamw, muon, got {args.optimizer!r}")


def _schedule_from_args(args):
    from rivervalley import schedules

    if args.schedule == "constant":
        return schedules.constant(args.lr)
    if args.schedule == "cosine":
        return schedules.cosine(args.lr, args.steps, warmup=args.warmup)
    return schedules.wsd(
        args.lr, args.steps, warmup=args.warmup, decay_fraction=args.decay_fraction, shape=args.decay_shape
    )


def _simulate_preflight(args) -> None:
    """Project every allocation of the run (the landscape, checkpoints, state, noise, results per seed,
    schedule) from the flags alone and refuse, naming the flags, one that does not fit: before the
    landscape is built and before anything is written."""
    from rivervalley.simulate.budget import (
        landscape_bytes,
        optimizer_buffers,
        require_simulation_memory,
        simulation_bytes,
    )
    from rivervalley.simulate.plan import checkpoint_plan, int_at_least

    seeds = int_at_least("--seeds", args.seeds, 1)
    steps, _, _, n_ckpts = checkpoint_plan(args.steps, ckpt_every=args.ckpt_every, ckpt_from=args.ckpt_from)
    if args.landscape == "matrix":
        if args.shape is None or min(args.shape) < 1:
            return  # the landscape refuses it
        dim, size_flag = args.shape[0] * args.shape[1], "--shape"
    elif args.curvatures is not None:
        dim, size_flag = 1 + len(args.curvatures), "--curvatures"
    else:
        m = 1 if args.m is None else args.m
        if m < 0:
            return  # the landscape refuses it
        dim, size_flag = 1 + m, "--m"
    buffers = optimizer_buffers(args.optimizer, args.momentum)
    parts = simulation_bytes(
        seeds=seeds,
        dim=dim,
        n_ckpts=n_ckpts,
        steps=steps,
        buffers=buffers,
        exact=args.exact,
        setup=landscape_bytes(args.landscape, dim, rotate=args.rotate, shape=args.shape),
    )
    require_simulation_memory(
        parts,
        sizes=f"{seeds} seeds (--seeds) x {n_ckpts} checkpoints (--steps {steps} --ckpt-every "
        f"{args.ckpt_every}) x {dim} parameters ({size_flag})",
        dtype="float64",
        hint=f"lower --seeds, {size_flag}, --steps or raise --ckpt-every"
        + (", or drop --rotate" if args.rotate and args.landscape != "matrix" else ""),
    )


def _cmd_simulate(args) -> int:
    import numpy as np

    from rivervalley.simulate import simulate

    if args.ckpt_every is None:
        args.ckpt_every = max(1, args.steps // 50)
    _simulate_preflight(args)
    land = _landscape_from_args(args)
    opt = _optimizer_from_args(args, land)
    sched = _schedule_from_args(args)
    claim_folder(args.out, args.force, "simulate")  # before the run, not after it
    t0 = time.perf_counter()
    res = simulate(
        land,
        opt,
        steps=args.steps,
        lr=sched,
        seeds=args.seeds,
        noise=args.noise,
        river_noise=args.river_noise,
        noise_kind=args.noise_kind,
        ckpt_every=args.ckpt_every,
        ckpt_from=args.ckpt_from,
        init=args.init,
        exact=args.exact,
        seed=args.seed,
        record_loss_every=None if args.exact else max(1, args.steps // 200),
    )
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "checkpoints": res.checkpoints.numpy(),
        "ckpt_steps": res.ckpt_steps,
        "ckpt_loss": res.ckpt_loss.numpy(),
        "final": res.final.numpy(),
    }
    if res.loss_curve is not None:
        arrays.update(loss_steps=res.loss_steps, loss_curve=res.loss_curve)
    write_file(out / "checkpoints.npz", lambda p: np.savez_compressed(p, **arrays))
    if res.loss_curve is not None:
        steps_, loss_ = res.loss_steps, res.loss_curve
    else:  # exact path: the seed-mean loss at the checkpoints
        steps_, loss_ = res.ckpt_steps, res.ckpt_loss.numpy().mean(0)
    rows = (f"{int(s)},{float(v):.10g}\n" for s, v in zip(steps_, loss_, strict=True))
    csv = "step,mean_loss\n" + "".join(rows)
    write_file(out / "loss_curve.csv", lambda p: p.write_text(csv))
    config = dict(res.config, steps=res.steps, ckpt_every=args.ckpt_every, wall_s=round(wall, 3))
    text = json.dumps(jsonable(config), indent=1)
    write_file(out / "config.json", lambda p: p.write_text(text))
    mark(out, {"tool": "rivervalley", "command": "simulate"})
    s, n, p = res.checkpoints.shape
    path = "exact path" if args.exact else "step path"
    final = float(res.ckpt_loss[:, -1].mean())
    print(
        f"simulated {s} seeds x {res.steps} steps ({path}) in {wall:.2f} s: {n} checkpoints of {p} "
        f"parameters; final mean loss {final:.5g}"
    )
    print(f"wrote {out / 'checkpoints.npz'}, {out / 'loss_curve.csv'}, {out / 'config.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# figures


def _cmd_figures(args) -> int:
    from rivervalley.figures import FIGURES, run_all

    unknown = sorted(set(args.only or []) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {', '.join(FIGURES)}")
    claim_folder(args.out, args.force, "figures")
    made = run_all(
        args.out,
        only=args.only,
        quick=args.quick,
        seed=args.seed,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    mark(args.out, {"tool": "rivervalley", "command": "figures"})
    for name, paths in made.items():
        print(f"{name}: " + ", ".join(str(p) for p in paths))
    return 0


# ---------------------------------------------------------------------------------------------------------
# parser


FORCE_HELP = "replace this command's own earlier output (never files it did not write)"


def build_parser() -> argparse.ArgumentParser:
    p = commandline.Parser(
        prog="rivervalley",
        description="River-valley theory of checkpoint averaging: validation, simulation and figures.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="formula vs simulation table over a grid of scenarios (THEORY §a–§f)")
    v.add_argument("--fast", action="store_true", help="fewer seeds and shorter runs (a few seconds)")
    v.add_argument("--json", help="where to write the JSON report (default: OUT/validation[_fast].json)")
    v.add_argument("-o", "--out", default="out/validate", help="output folder (default out/validate)")
    v.add_argument("--seeds", type=int, help="independent seeds per study (default: per-study choice)")
    v.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    v.add_argument("--only", nargs="+", metavar="STUDY", help="run only these studies (by name)")
    v.add_argument(
        "--noise-backend",
        choices=["torch", "native"],
        default="torch",
        help="Gaussian draws: torch float64 (default, the reference) or the simulator's compiled Philox "
        "kernel (float32 draws, its default when available)",
    )
    v.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    v.add_argument("--force", action="store_true", help=FORCE_HELP)
    v.set_defaults(func=_cmd_validate)

    s = sub.add_parser("simulate", help="simulate an optimizer on a toy landscape, write checkpoints")
    g = s.add_argument_group("landscape")
    g.add_argument("--landscape", choices=["quadratic", "matrix"], default="quadratic")
    g.add_argument("--slope", type=float, default=1.0, help="river slope c (default 1)")
    g.add_argument("--river-curvature", type=float, default=0.0, help="river curvature μ (0: linear river)")
    g.add_argument("--curvatures", type=_floats, help="valley curvatures, comma-separated (e.g. 1,0.1)")
    g.add_argument("--m", type=int, help="number of valley directions (with --power-law, or all ones)")
    g.add_argument("--power-law", type=_pair, metavar="LMAX,EXP", help="λ_i = LMAX·i^−EXP, i = 1..m")
    g.add_argument("--rotate", action="store_true", help="rotate the landscape by a random orthogonal matrix")
    g.add_argument("--shape", type=_shape, help="matrix landscape shape A,B (for Muon)")
    g = s.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", default="sgd", help="sgd, adam, adamw or muon (default sgd)")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    g.add_argument("--lr", type=float, default=0.1, help="(peak) learning rate (default 0.1)")
    g.add_argument("--schedule", choices=["constant", "cosine", "wsd"], default="constant")
    g.add_argument("--warmup", type=int, default=0, help="warmup steps (cosine, wsd)")
    g.add_argument("--decay-fraction", type=float, default=0.2, help="WSD decay fraction (default 0.2)")
    g.add_argument("--decay-shape", choices=["linear", "cosine", "1-sqrt"], default="linear")
    g = s.add_argument_group("run")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--seeds", type=int, default=8, help="independent runs (default 8)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--noise", type=float, default=1.0, help="gradient noise σ (default 1)")
    g.add_argument("--river-noise", type=float, help="river noise σ_u (default: σ)")
    g.add_argument("--noise-kind", choices=["additive", "minibatch"], default="additive")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default steps/50)")
    g.add_argument("--ckpt-from", type=int, default=0, help="first checkpoint step (default 0)")
    g.add_argument("--init", choices=["zero", "stationary"], default="zero")
    g.add_argument("--exact", action="store_true", help="exact AR(1) fast path (quadratic, SGD, constant lr)")
    s.add_argument("-o", "--out", default="out/simulate", help="output folder (default out/simulate)")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(func=_cmd_simulate)

    f = sub.add_parser("figures", help="draw every paper figure (rivervalley.figures) into one folder")
    f.add_argument("-o", "--out", default="out/figures", help="output folder (default out/figures)")
    f.add_argument("--only", nargs="+", metavar="NAME", help="only these figures")
    f.add_argument("--quick", action="store_true", help="fewer seeds (seconds per figure)")
    f.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    f.add_argument("--force", action="store_true", help=FORCE_HELP)
    f.set_defaults(func=_cmd_figures)
    return p


def main(argv=None) -> int:
    """Entry point of the `rivervalley` console script; returns the exit status (rivervalley.common.cli)."""
    return commandline.run("rivervalley", build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
