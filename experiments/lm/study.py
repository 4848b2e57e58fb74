"""The LM study on a run made by ``experiments.lm.train``: a thin wrapper of ``extramerge study``.

    python -m experiments.lm.study --run RUN [-o RUN/study] [--quick] [extramerge study options]

Checkpoints: RUN/step_XXXXXX/; calibration half: RUN/data/val.jsonl; measurement half: RUN/data/test.jsonl;
learning rate at each checkpoint: RUN/log.jsonl. Everything else is ``extramerge.study``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from extramerge.study import StudyConfig, StudyError, study
from extramerge.study.cli import add_arguments, config_from_args
from extramerge.study.report import summary_lines
from rivervalley.common.publish import interruptible

__all__ = ["run_config", "main", "print_table", "StudyError"]

PROG = "experiments.lm.study"


def run_config(args) -> StudyConfig:
    run = Path(args.run)
    if not run.is_dir():
        raise StudyError(f"{run}: no such run folder")
    steps = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if not steps:
        raise StudyError(
            f"{run}: no step_XXXXXX checkpoints (train with --ckpt-every, or point --run at a run)"
        )
    data = run / "data"
    if not args.data and not args.calib and not (data / "val.jsonl").is_file():
        raise StudyError(
            f"{run}: no held-out data (expected {data}/val.jsonl and test.jsonl, or give --data)"
        )
    calib = test = None
    if not args.data and not args.calib:
        calib, test = str(data / "val.jsonl"), str(data / "test.jsonl")
        calib = None if args.measure else calib  # --measure: the calibration half is the predictions'
        test = None if args.predict_only else test  # --predict-only: never read
    return config_from_args(
        args,
        checkpoints=[str(p) for p in steps],
        out=args.output or run / "study",
        run=run,
        calib=calib,
        test=test,
    )


def print_table(report: dict, file=None) -> None:
    for line in summary_lines(report):
        print(line, file=file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="extramerge study on a run of experiments.lm.train")
    p.add_argument("--run", required=True, type=Path, help="run folder (step_XXXXXX/ checkpoints, data/)")
    p.add_argument(
        "-o", "--output", "--out", type=Path, default=None, help="output folder (default RUN/study)"
    )
    add_arguments(p, checkpoints=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    try:
        with interruptible():  # SIGTERM/SIGHUP unwind like Ctrl-C: the staging folder is removed
            report = study(run_config(args))
    except KeyboardInterrupt as e:
        sig = signal.Signals(getattr(e, "signum", signal.SIGINT))
        print(
            f"{PROG}: stopped by {sig.name}; nothing was written (a study is all or nothing); "
            f"start again with: python -m {PROG} {shlex.join(argv)}",
            file=sys.stderr,
        )
        return 128 + sig
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    print_table(report)
    wrote = "predictions.json, predictions.md" if args.predict_only else "study.json, study.md"
    print(f"wrote {report['out']}/{wrote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
