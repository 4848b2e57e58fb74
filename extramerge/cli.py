"""`extramerge` command line: inspect, analyze and merge training checkpoints.

    extramerge inspect CKPT... [--json]
    extramerge analyze CKPT... [--windows 1,2,4,8] -o DIR
    extramerge merge CKPT... --method {sma,ema,wma,extra,trend,pc1,decay,posthoc-ema,custom} [knobs]
        -o OUT [--dry-run]
    extramerge eval MODEL... --data FILE [--cloze N|FILE.jsonl] [--json OUT.json] [--lm-eval]
    extramerge study CKPT... --data TEXT -o OUT [--lr-schedule SPEC] [--quick]

CKPT is a checkpoint file (.safetensors, .bin, .pt), a Hugging Face model folder, or a folder of
step_XXXX/ checkpoints (expanded and sorted by step). Checkpoints are ordered oldest first as given.
Exit status: 0 on success, 2 on a usage or input error (one line on stderr, never a traceback).

merge, analyze and study also run as several processes, each doing its share (extramerge.distributed):
    torchrun --nproc-per-node N -m extramerge merge CKPT... --method sma -o OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter

from rivervalley.common import cli as commandline
from rivervalley.common.formatting import format_bytes

from . import distributed, methods
from .argtypes import ints
from .eval import cli as eval_cli
from .io import CheckpointError
from .study import cli as study_cli

__all__ = ["main", "build_parser"]

PROG = "extramerge"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------------------ inspect


def _inspect(args) -> int:
    from .io import check_compatible, load_checkpoints
    from .io.safety import shown

    ckpts = load_checkpoints(args.checkpoints)
    try:
        rows = []
        for c in ckpts:
            dtypes = Counter(i.dtype_name for i in c.infos.values())
            rows.append(
                {
                    "path": str(c.path),
                    "format": c.format,
                    "step": c.step,
                    "tensors": len(c.infos),
                    "parameters": int(sum(i.numel for i in c.infos.values())),
                    "bytes": int(c.nbytes),
                    "dtypes": dict(sorted(dtypes.items())),
                    "aliases": dict(getattr(c, "aliases", {}) or {}),
                    "state_tensors": len(c.state_tensors),  # DCP/Megatron optimizer state: not merged
                    "state_bytes": int(sum(i.nbytes for i in c.state_tensors.values())),
                }
            )
        try:
            infos = check_compatible(ckpts)
            consistency = {"consistent": True, "tensors": len(infos), "problem": None}
        except ValueError as e:
            consistency = {"consistent": False, "tensors": None, "problem": commandline.oneline(e)}
    finally:
        for c in ckpts:
            c.close()
    if args.json:
        print(json.dumps({"checkpoints": rows, **consistency}, indent=1))
    else:
        print(f"{'#':>3} {'step':>8} {'format':<15} {'tensors':>7} {'params':>9} {'size':>10}  dtypes / path")
        for i, r in enumerate(rows):
            dt = ",".join(f"{k}×{v}" for k, v in r["dtypes"].items())
            step = "-" if r["step"] is None else r["step"]
            print(
                f"{i:>3} {step:>8} {r['format']:<15} {r['tensors']:>7} {_count(r['parameters']):>9} "
                f"{format_bytes(r['bytes']):>10}  {dt}  {r['path']}"
            )
            if r["aliases"]:
                pairs = (f"{shown(a)} -> {shown(b)}" for a, b in r["aliases"].items())  # names from the file
                print(f"{'':>4}tied/aliased: " + ", ".join(pairs))
            if r["state_tensors"]:
                n, size = r["state_tensors"], format_bytes(r["state_bytes"])
                print(
                    f"{'':>4}{n} training-state tensor{'s' * (n != 1)} ({size}: optimizer, scheduler ...) "
                    "left out: never merged, absent from a merged checkpoint"
                )
        if consistency["consistent"]:
            print(
                f"consistent: yes ({len(rows)} checkpoints, {consistency['tensors']} tensors with equal "
                "names, shapes and dtypes)"
            )
        else:
            print(f"consistent: NO: {consistency['problem']}")
    if not consistency["consistent"]:
        raise _InputError(consistency["problem"])
    return 0


# ------------------------------------------------------------------------------------------------ analyze


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def _analyze(args) -> int:
    from .trajectory import analyze

    distributed.join()  # under torchrun/srun: each process reads its share of the Gram pass

    report = analyze(
        args.checkpoints, windows=args.windows, output=args.output, progress=not args.quiet, force=args.force
    )
    steps = [c["step"] for c in report["checkpoints"]]
    span = f" (steps {steps[0]}..{steps[-1]})" if None not in steps else ""
    print(
        f"analysed {report['n_checkpoints']} checkpoints{span}: {report['tensors']} float tensors, "
        f"{_count(report['parameters'])} parameters, |θ_newest| = {report['reference']['norm']:.4g}"
    )
    print(
        f"{'':<10} {'n':>3} {'FVE1':>7} {'mean cos':>9} {'PC1 drift/ckpt':>15} {'(rel. |θ|)':>11}"
        f" {'resid':>9}"
    )
    rows = [("raw", report["raw"])] + [(f"SMA K={k}", g) for k, g in report["merged"].items() if k != "1"]
    for label, g in rows:
        print(
            f"{label:<10} {g['n']:>3} {g['fve1']:>7.4f} {_fmt(g['mean_cosine'], '.3f'):>9} "
            f"{g['pc1_drift']:>15.4g} {_fmt(g['pc1_drift_relative']):>11} {g['pc1_residual_std']:>9.3g}"
        )
    if report["skipped_windows"]:
        print(f"windows {report['skipped_windows']} skipped: a merged sequence needs at least 2 points")
    r = report["river"]
    print(
        f"river: drift {r['drift']:.4g} per checkpoint; valley noise √V = {r['noise_std']:.4g}, "
        f"lag-1 autocorrelation ρ = {r['rho']:.2f}"
    )
    if "extra_suggestion" in report:
        s = report["extra_suggestion"]
        print(
            f"extra-merge --window {s['window']} --offset {s['offset']}: α_match = {s['alpha_match']:.3f} "
            f"(zero lag), α_geometric = {s['alpha_geometric']:.3f} (noise-aware, parameter space)"
        )
    if args.output:
        files = report["files"]
        print(f"wrote {files['analysis']}, {files['gram']} and figures:")
        for key in ("spectrum", "trajectory", "per_layer"):
            print(f"  {files[key]}")
    return 0


# -------------------------------------------------------------------------------------------------- merge


def _merge(args) -> int:
    from . import api

    distributed.join()  # under torchrun/srun: each process merges its share of the tensors
    with distributed.agreed():  # a checkpoint one process cannot open fails them all, here
        ckpts, _ = api.open_all(args.checkpoints)
    try:
        given = {name: getattr(args, name) for name in methods.all_params()}
        plan = api.plan(ckpts, args.method, progress=not args.quiet, **given)
        knobs = ", ".join(f"{k}={v}" for k, v in plan.params.items() if not isinstance(v, dict))
        print(f"method {plan.method}" + (f" ({knobs})" if knobs else ""))
        print(f"weights (oldest first, sum {plan.weights.sum():.6g}):")
        for c, w in zip(ckpts, plan.weights, strict=True):
            step = "" if c.step is None else f"step {c.step}"
            print(f"  {w:+.6f}  {step:<12} {c.path}")
        for note in plan.notes:
            print(f"note: {note}")
        summary = api.execute(
            ckpts,
            plan,
            args.output,
            dtype=args.dtype,
            accumulate=args.accumulate,
            shard_size=args.shard_size,
            dry_run=args.dry_run,
            force=args.force,
            progress=not args.quiet,
            allow_nonfinite=args.allow_nonfinite,
        )
    finally:
        for c in ckpts:
            c.close()
    print(summary)
    return 0


# ------------------------------------------------------------------------------------------------- parser


def build_parser(ranks: bool = False) -> argparse.ArgumentParser:
    p = commandline.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{inspect,analyze,merge,eval,study}")
    ck = "checkpoint files or folders, oldest first (a folder of step_XXXX/ checkpoints is expanded)"

    q = sub.add_parser("inspect", help="formats, tensors, dtypes, parameter counts and consistency")
    q.add_argument("checkpoints", nargs="+", metavar="CKPT", help=ck)
    q.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    q.set_defaults(func=_inspect)

    a = sub.add_parser("analyze", help="trajectory geometry (PCA, rank-1 fraction, drift) from one pass")
    a.add_argument("checkpoints", nargs="+", metavar="CKPT", help=ck)
    a.add_argument(
        "--windows",
        type=ints,
        default=[1, 2, 4, 8],
        metavar="K1,K2,...",
        help="SMA windows to compare with the raw trajectory (default 1,2,4,8; larger than N-1 are skipped)",
    )
    a.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="write analysis.json, gram.npz and PNG figures here (atomically)",
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="kept for compatibility: an earlier analysis (marked by .extramerge-output) is replaced "
        "anyway, and any other non-empty folder never is",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_analyze)

    m = sub.add_parser("merge", help="merge checkpoints with one weight vector, streaming tensor by tensor")
    m.add_argument("checkpoints", nargs="+", metavar="CKPT", help=ck)
    m.add_argument(
        "--method",
        required=True,
        choices=list(methods.REGISTRY),
        help=methods.cli_help(),
    )
    for knob in methods.all_params().values():  # each method's parameters: one flag per knob
        m.add_argument(
            knob.flag,
            dest=knob.name,
            type=knob.type,
            default=knob.default,
            metavar=knob.metavar,
            help=knob.help,
        )
    m.add_argument(
        "--dtype",
        default="same",
        choices=["same", "float32", "bfloat16", "float16"],
        help="output dtype of floating tensors (default: same as the inputs)",
    )
    m.add_argument(
        "--accumulate",
        default="float32",
        choices=["float32", "float64"],
        help="accumulation precision of the weighted sum (default float32)",
    )
    m.add_argument(
        "--shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest output shard, e.g. 5GB, 500MB (default 5GB); for DCP and Megatron outputs the size of "
        "each .distcp file, a larger tensor stored as row blocks across files (under torchrun/srun each "
        "process writes whole files)",
    )
    m.add_argument(
        "--dry-run",
        action="store_true",
        help="validate all inputs, print weights, projected bytes and peak memory; write nothing",
    )
    m.add_argument("--force", action="store_true", help="replace an existing non-empty output")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge tensors containing NaN/Inf anyway")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="output folder (or .safetensors file)"
    )
    m.set_defaults(func=_merge)

    e = sub.add_parser("eval", help="held-out loss, bits/byte and cloze accuracy of causal LM folders")
    eval_cli.add_arguments(e)
    e.set_defaults(func=eval_cli.run_command)

    st = sub.add_parser(
        "study",
        help="which merge to ship: recommendation chosen on held-out text, predicted vs measured gain",
    )
    study_cli.add_arguments(st)
    st.set_defaults(func=study_cli.run_command)
    if ranks:  # one of several processes (torchrun, srun): merge, analyze and study split their work
        for one in (q, e):
            one.set_defaults(func=_one_process)
    return p


# -------------------------------------------------------------------------------------------------- errors


class _InputError(ValueError):
    """An input problem already reported in full on stdout; stderr gets its one line."""


def _one_process(args) -> int:
    raise ValueError(
        f"extramerge {args.command} runs as one process: start it without torchrun/srun (merge, analyze "
        "and study split their work across processes)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `extramerge` console script; returns the exit status (rivervalley.common.cli).

    Under torchrun/srun (``distributed.launch_from_env``) every process runs the command; only rank 0
    prints (summary, progress, the one-line error of a failure on any rank), no rank ends before rank 0
    has printed, and each ends its process itself (``distributed.end_process``) instead of returning."""
    try:
        launch = distributed.launch_from_env()
    except ValueError:
        launch = None  # malformed variables: merge and analyze report them when they join
    if launch is None:
        return commandline.run(PROG, build_parser(), argv, errors=(CheckpointError,))
    with contextlib.ExitStack() as quiet:
        if launch.rank != 0:
            null = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(null))
            quiet.enter_context(contextlib.redirect_stderr(null))
        try:
            code = commandline.run(PROG, build_parser(ranks=True), argv, errors=(CheckpointError,))
        finally:
            distributed.leave()
    distributed.end_process(code)  # no interpreter teardown: gloo can abort there (see end_process)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
