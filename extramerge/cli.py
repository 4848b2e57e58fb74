"""`extramerge` command line: inspect, analyze and merge training checkpoints.

    extramerge inspect CKPT... [--json]
    extramerge analyze CKPT... [--windows 1,2,4,8] -o DIR
    extramerge merge CKPT... --method {sma,ema,wma,extra,trend,pc1,custom} [knobs] -o OUT [--dry-run]
    extramerge eval MODEL... --data FILE [--cloze N|FILE.jsonl] [--json OUT.json] [--lm-eval]
    extramerge study CKPT... --data TEXT -o OUT [--lr-schedule SPEC] [--quick]

CKPT is a checkpoint file (.safetensors, .bin, .pt), a Hugging Face model folder, or a folder of
step_XXXX/ checkpoints (expanded and sorted by step). Checkpoints are ordered oldest first as given.
Exit status: 0 on success, 2 on a usage or input error (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from .argtypes import floats, ints

__all__ = ["main", "build_parser"]

PROG = "extramerge"


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} TB"  # pragma: no cover


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------------------ inspect


def _inspect(args) -> int:
    from .checkpoints import check_compatible, load_checkpoints
    from .safety import shown

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
                }
            )
        try:
            infos = check_compatible(ckpts)
            consistency = {"consistent": True, "tensors": len(infos), "problem": None}
        except ValueError as e:
            consistency = {"consistent": False, "tensors": None, "problem": _oneline(e)}
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
                f"{_human(r['bytes']):>10}  {dt}  {r['path']}"
            )
            if r["aliases"]:
                pairs = (f"{shown(a)} -> {shown(b)}" for a, b in r["aliases"].items())  # names from the file
                print(f"{'':>4}tied/aliased: " + ", ".join(pairs))
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

    ckpts, _ = api.open_all(args.checkpoints)
    try:
        plan = api.plan(
            ckpts,
            args.method,
            window=args.window,
            offset=args.offset,
            alpha=args.alpha,
            decay=args.decay,
            weights=args.weights,
            ahead=args.ahead,
            gram=args.gram,
            progress=not args.quiet,
        )
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


# --------------------------------------------------------------------------------------------------- eval


def _cloze_source(text: str) -> int | str:
    try:
        n = int(text)
    except ValueError:
        return text
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of items >= 0 or a .jsonl file, got {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _model_folders(paths: list[str]) -> list[tuple[str, object, int | None]]:
    """(display name, folder, step) per model: a model folder as given, a run folder expanded to its step
    folders (oldest first, as `load_checkpoints` orders them). Every folder is checked before any work."""
    from pathlib import Path

    from .checkpoints import load_checkpoints, parse_step
    from .evaluate import check_model_folder

    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ValueError(f"{p}: no such file or folder")
        if path.is_dir() and not (path / "config.json").is_file():
            ckpts = load_checkpoints([path])
            for c in ckpts:
                c.close()
            out.extend((f"{path.name}/{c.path.name}", c.path, c.step) for c in ckpts)
        else:
            out.append((str(p), path, parse_step(path.name)))
    for _, folder, _ in out:
        check_model_folder(folder)
    return out


def _eval_inputs(args, models) -> list:
    """Everything eval reads (never written onto or into): the data and cloze files, each model folder and
    the tokenizer files it uses (possibly in its run folder)."""
    from .evaluate import tokenizer_files

    inputs = [Path(args.data)] + ([Path(args.cloze)] if isinstance(args.cloze, str) else [])
    for _, folder, _ in models:
        inputs += [Path(folder), *tokenizer_files(folder)]
    return inputs


def _is_eval_json(path) -> bool:
    from .outputs import _own_json

    return _own_json(path, "kind", "eval")


def _eval(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from . import evaluate as E
    from .outputs import check_file, write_file

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = _model_folders(args.models)
    inputs = _eval_inputs(args, models)
    for out, own in ((args.json, _is_eval_json), (args.save_cloze, E.is_cloze_file)):
        if out:  # before any work: refused outputs fail now, not after the evaluation
            check_file(out, force=args.force, own=own, inputs=inputs)
    texts = E.load_texts(args.data)
    items = None
    if isinstance(args.cloze, str):
        items = E.load_cloze(args.cloze)
    elif args.cloze > 0:
        items = E.build_cloze(texts, n_items=args.cloze, n_candidates=args.candidates, seed=args.seed)
    if items is not None and args.save_cloze:
        E.save_cloze(items, args.save_cloze, force=args.force, inputs=inputs)
    task_dir = None
    if args.lm_eval:
        import tempfile

        from . import lmeval

        lmeval.require_lm_eval()
        task_dir = tempfile.mkdtemp(prefix="extramerge-lmeval-")
        lmeval.write_task(texts, task_dir)
        if items is not None:
            lmeval.write_task(items, task_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    width = max(24, *(len(name) for name, _, _ in models))
    head = f"{len(texts)} documents from {args.data}"
    if items:
        head += f"; {len(items)} cloze items, chance {1 / len(items[0].candidates):.3f}"
    print(head)
    print(f"{'model':<{width}} {'loss':>7} {'bits/byte':>9} {'cloze acc ± se':>16} {'tokens/s':>9}")
    cache: dict = {}
    rows = []
    try:
        for name, folder, step in models:
            t0 = time.perf_counter()
            model, tok = E.load_model(folder, device=device)
            load_s = time.perf_counter() - t0
            seq_len = args.seq_len or E.max_positions(model)
            if seq_len is None:
                raise ValueError(f"{folder}: the model config states no maximum length: pass --seq-len")
            key = (E.tokenizer_fingerprint(folder), seq_len)
            if key not in cache or key[0] is None:
                cache[key] = E.token_blocks(texts, tok, seq_len)
            row = E.evaluate_model(
                model,
                texts,
                tokenizer=tok,
                blocks=cache[key],
                cloze_items=items,
                batch_size=args.batch_size,
                cloze_batch_size=args.cloze_batch_size,
                device=device,
            )
            row.update(name=name, path=str(folder), step=step, load_seconds=load_s)
            c = row["cloze"]
            acc = "-" if c is None else f"{c['accuracy']:.3f} ± {c['stderr']:.3f}"
            print(
                f"{name:<{width}} {row['loss']:>7.4f} {row['bits_per_byte']:>9.4f} {acc:>16} "
                f"{row['tokens_per_s']:>9.0f}",
                flush=True,
            )
            del model
            if task_dir is not None:
                from .lmeval import run_lm_eval

                lm = run_lm_eval(folder, task_dir, device=device, batch_size=args.batch_size)
                row["lm_eval"] = lm
                res = lm["results"]
                parts = [f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float))
                         for t, r in res.items()]  # fmt: skip
                print(f"{'':<{width}} lm-eval {'; '.join(parts)}", flush=True)
            rows.append(row)
    finally:
        if task_dir is not None:
            import shutil

            shutil.rmtree(task_dir, ignore_errors=True)
    if args.json:
        record = {
            "tool": "extramerge",
            "kind": "eval",
            "data": str(args.data),
            "documents": len(texts),
            "device": device,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "cloze": None
            if items is None
            else {
                "source": args.cloze if isinstance(args.cloze, str) else "built",
                "items": len(items),
                "candidates": len(items[0].candidates),
                "seed": args.seed,
            },
            "models": rows,
        }
        write_file(
            args.json, json.dumps(record, indent=1) + "\n", force=args.force, own=_is_eval_json, inputs=inputs
        )
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
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
        choices=["sma", "ema", "wma", "extra", "trend", "pc1", "custom"],
        help="sma: mean of the last K; ema: exponential (decay B); wma: linear ramp; extra: "
        "Extra-Merge M_N + α(M_N − M_{N−d}); trend: least-squares line; pc1: SMA moved onto "
        "the PC1 trend; custom: --weights",
    )
    m.add_argument(
        "--window", type=int, metavar="K", help="checkpoints per window (default: all N; extra: N//2)"
    )
    m.add_argument(
        "--offset",
        type=int,
        metavar="D",
        help="extra: distance d between the two windows' ends (default N − K)",
    )
    m.add_argument(
        "--alpha",
        metavar="A",
        help="extra: a number, 'match' ((K−1)/(2d): zero lag, the default) or 'geometric' "
        "(noise-aware estimate from a Gram pass)",
    )
    m.add_argument("--decay", type=float, metavar="B", help="ema: decay β in [0,1) (default 1 − 2/(N+1))")
    m.add_argument(
        "--weights",
        type=floats,
        metavar="W1,W2,...",
        help="custom: one weight per checkpoint, oldest first (a leading minus needs --weights=-0.5,1.5)",
    )
    m.add_argument(
        "--ahead",
        type=float,
        default=0.0,
        metavar="H",
        help="trend/pc1: evaluate the line H checkpoints past the newest (default 0)",
    )
    m.add_argument(
        "--gram",
        metavar="NPZ",
        help="pc1 / --alpha geometric: reuse gram.npz from `extramerge analyze` (no extra pass)",
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
        help="largest output shard, e.g. 5GB, 500MB (default 5GB)",
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
    e.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="Hugging Face model folders, or run folders of step_XXXX/ model folders (each is evaluated)",
    )
    e.add_argument(
        "--data", required=True, metavar="FILE", help="held-out text: .jsonl ({'text': ...} per line), .txt"
    )
    e.add_argument(
        "--cloze",
        type=_cloze_source,
        default=200,
        metavar="N|FILE.jsonl",
        help="cloze items: build N from --data (default 200; 0 = no cloze) or load a saved item set",
    )
    e.add_argument("--candidates", type=_positive, default=8, help="candidates per built item (default 8)")
    e.add_argument("--seed", type=int, default=0, help="seed of the built cloze items (default 0)")
    e.add_argument("--save-cloze", metavar="FILE.jsonl", help="save the cloze items used, to reuse later")
    e.add_argument("--seq-len", type=_positive, help="tokens per evaluation block (default: model maximum)")
    e.add_argument("--batch-size", type=_positive, default=16, help="blocks per forward pass (default 16)")
    e.add_argument("--cloze-batch-size", type=_positive, default=32, help="cloze sequences per pass (32)")
    e.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    e.add_argument(
        "--threads", type=_positive, help="torch CPU threads (default torch's; 1 is best on a busy machine)"
    )
    e.add_argument("--json", metavar="OUT.json", help="also write all results here (atomically)")
    e.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --json / --save-cloze file that an earlier extramerge eval wrote",
    )
    e.add_argument(
        "--lm-eval",
        action="store_true",
        help="also run lm-evaluation-harness on the same items and documents (pip install 'lm-eval[hf]')",
    )
    e.set_defaults(func=_eval)

    from .study.cli import add_arguments, run_command

    st = sub.add_parser(
        "study",
        help="which merge to ship: recommendation chosen on held-out text, predicted vs measured gain",
    )
    add_arguments(st)
    st.set_defaults(func=run_command)
    return p


# -------------------------------------------------------------------------------------------------- errors


class _InputError(ValueError):
    """An input problem already reported in full on stdout; stderr gets its one line."""


def _oneline(e: BaseException, limit: int = 2000) -> str:
    """The message on one line, control characters escaped (a name read from a file cannot drive the
    terminal), at most ``limit`` characters."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.strerror}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(msg.split()))
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (
        ValueError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        FileExistsError,
    )
    try:
        from .checkpoints import CheckpointError

        errors += (CheckpointError,)
    except ImportError:  # pragma: no cover - checkpoints module missing in a broken install
        pass
    return errors


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(
        f"{PROG}: warning: {_oneline(message if isinstance(message, Warning) else Warning(message))}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `extramerge` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = _show_warning
        from .outputs import Terminated, interruptible

        try:
            with interruptible():  # SIGTERM/SIGHUP unwind like Ctrl-C: no staging folder is left behind
                return int(args.func(args) or 0)
        except Terminated as e:
            print(f"{PROG}: terminated ({e})", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as e:
            if isinstance(e, _user_errors()):
                print(f"{PROG}: error: {_oneline(e)}", file=sys.stderr)
                return 2
            if isinstance(e, OSError):
                print(f"{PROG}: error: {_oneline(e)}", file=sys.stderr)
                return 1
            raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
