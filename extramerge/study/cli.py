"""``extramerge study`` arguments (shared by ``python -m experiments.lm.study``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..argtypes import floats, ints
from .core import CANDIDATE_ALPHAS, StudyConfig
from .models import ModelSource

__all__ = ["add_arguments", "config_from_args", "run_command"]


def add_arguments(p: argparse.ArgumentParser, *, checkpoints: bool = True) -> None:
    if checkpoints:
        p.add_argument(
            "checkpoints",
            nargs="*",
            metavar="CKPT",
            help="HF model folders, a run folder or a folder of step_N/ checkpoint-N/ folders (with "
            "--measure: default the checkpoints the predictions name)",
        )
        p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
        p.add_argument(
            "--revisions",
            metavar="REVS",
            help="CKPT is one Hugging Face Hub repository (org/name) and these its revisions, found in "
            "huggingface_hub's cache (never downloaded): step1000,step2000,... or step1000:step8000:1000; "
            "the step is the one a name carries, else the order given",
        )
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="TEXT",
        help=".txt/.jsonl files or folders, split by document into calibration and measurement halves",
    )
    p.add_argument("--calib", metavar="FILE", help="calibration half (with --test, instead of --data)")
    p.add_argument("--test", metavar="FILE", help="measurement half (with --calib)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the checkpoints' own)")
    p.add_argument(
        "--lr-schedule",
        metavar="SPEC",
        help="learning rate at the checkpoints: a run.json, a JSONL log with step/lr, or step:lr,... "
        "(default: the run folder's log; else constant)",
    )
    p.add_argument("--window", type=int, default=4, metavar="K", help="Extra-Merge window K (default 4)")
    p.add_argument(
        "--offsets", type=ints, default=(2, 4, 8), metavar="D,...", help="offsets d (default 2,4,8)"
    )
    p.add_argument(
        "--alphas",
        type=floats,
        default=CANDIDATE_ALPHAS,
        metavar="A,...",
        help=f"candidate α grid (default {','.join(map('{:g}'.format, CANDIDATE_ALPHAS))})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="only the recommendation: no measurement half, a short candidate list",
    )
    p.add_argument(
        "--forecast-from",
        type=int,
        default=None,
        metavar="STEP",
        help="also choose the merge from the checkpoints up to STEP only, and measure that choice at the "
        "newest checkpoint (the choice an online merge faces)",
    )
    p.add_argument(
        "--predict-only",
        action="store_true",
        help="pre-register: write OUT/predictions.json (every merge's predicted ΔL and interval, α*, the "
        "recommendation, the forecast) from --calib alone; the measurement half is never read",
    )
    p.add_argument(
        "--measure",
        type=Path,
        default=None,
        metavar="PRED",
        help="measure the merges of earlier predictions (a --predict-only output) on --test FILE and write "
        "the usual study; refuses other checkpoints, another tokenizer, or the calibration half as --test",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        default=None,
        help="build each merge from the checkpoint files tensor by tensor (memory: the model and one tensor) "
        "even where every checkpoint fits in memory (default: stacked where that fits in half of it)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the checkpoints and the text and print the projected memory; evaluate and write nothing",
    )
    p.add_argument(
        "--config",
        dest="model_config",
        metavar="DIR",
        help="an HF config folder (config.json) to build the model from, for checkpoints in another format "
        "(.pt, safetensors files, DCP) whose tensors carry that model's HF names",
    )
    p.add_argument(
        "--model-factory",
        metavar="MODULE:FN",
        help="a function building the model (a torch.nn.Module) from the newest checkpoint, for checkpoints "
        "of other models, e.g. extramerge.study.factories:nanogpt for nanoGPT .pt files",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N (default cpu); under torchrun cuda is each process's cuda:LOCAL_RANK",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default), or bf16: forwards under bf16 autocast, the loss in float32 (merges are always "
        "built in float32 or better)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--force", action="store_true", help="replace an earlier study in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(a, *, checkpoints=None, out=None, run=None, calib=None, test=None) -> StudyConfig:
    from .inputs import StudyError

    if a.window < 1:
        raise StudyError(f"--window {a.window}: must be at least 1")
    if a.batch_size < 1:
        raise StudyError(f"--batch-size {a.batch_size}: must be at least 1")
    if not a.alphas:
        raise StudyError("--alphas: the α grid is empty")
    if a.threads is not None and a.threads < 1:
        raise StudyError(f"--threads {a.threads}: must be at least 1")
    _check_device(a.device)
    ckpts = list(checkpoints if checkpoints is not None else a.checkpoints)
    if getattr(a, "revisions", None) is not None:
        ckpts = _revisions(ckpts, a.revisions)
    measure = getattr(a, "measure", None)
    if measure is not None:
        fixed = {
            "--window": a.window != 4,
            "--offsets": tuple(a.offsets) != (2, 4, 8),
            "--alphas": tuple(a.alphas) != tuple(CANDIDATE_ALPHAS),
            "--forecast-from": a.forecast_from is not None,
            "--lr-schedule": a.lr_schedule is not None,
            "--quick": a.quick,
        }
        given = [flag for flag, on in fixed.items() if on]
        if given:
            raise StudyError(
                f"{', '.join(given)}: fixed by the predictions; --measure PRED takes them from PRED"
            )
    elif not ckpts:
        raise StudyError("no checkpoints: give CKPT ... (or --measure PRED to measure earlier predictions)")
    ModelSource(config=a.model_config, factory=a.model_factory).check()
    if a.predict_only and a.quick:
        raise StudyError("--quick has no measurement half to skip; --predict-only already reads none")
    if run is None and len(ckpts) == 1 and (Path(ckpts[0]) / "run.json").is_file():
        run = Path(ckpts[0])
    return StudyConfig(
        checkpoints=ckpts,
        out=Path(out if out is not None else a.output),
        data=list(a.data),
        calib=a.calib or calib,
        test=a.test or test,
        tokenizer=a.tokenizer,
        lr_schedule=a.lr_schedule,
        run=run,
        window=a.window,
        offsets=tuple(a.offsets),
        alphas=tuple(a.alphas),
        quick=a.quick,
        forecast_from=a.forecast_from,
        device=a.device,
        dtype=a.dtype,
        batch_size=a.batch_size,
        threads=a.threads,
        force=a.force,
        progress=not a.quiet,
        predict_only=a.predict_only,
        stream=a.stream,
        dry_run=a.dry_run,
        measure=measure,
        model_config=a.model_config,
        model_factory=a.model_factory,
    )


def _check_device(device: str) -> None:
    """--device names a device this machine has: one line naming it otherwise."""
    import torch

    from .inputs import StudyError

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise StudyError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise StudyError(f"--device {device}: the study runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise StudyError(f"--device {device}: CUDA is not available")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise StudyError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def _revisions(ckpts: list, spec: str) -> list[str]:
    """``REPO --revisions SPEC`` as the checkpoints REPO@rev, ... (resolved from the cache by the study)."""
    from ..io import CheckpointError
    from .hub import hub_ref, parse_revisions
    from .inputs import StudyError

    try:
        revs = parse_revisions(spec)
    except CheckpointError as e:
        raise StudyError(str(e)) from None
    if len(ckpts) != 1 or hub_ref(str(ckpts[0])) is None or "@" in str(ckpts[0]):
        given = " ".join(map(str, ckpts)) or "none"
        raise StudyError(
            f"--revisions: give one Hugging Face Hub repository (org/name, not a local path) as CKPT, "
            f"not {given}"
        )
    return [f"{ckpts[0]}@{r}" for r in revs]


def run_command(args) -> int:
    """`extramerge study`: run it, print the summary and where it was written."""
    from .. import distributed
    from . import study
    from .report import plan_line, summary_lines

    distributed.join()  # under torchrun/srun: each process evaluates its share of every half
    rep = study(config_from_args(args))
    if rep.get("dry_run"):
        print(plan_line(rep["plan"]) + "; nothing evaluated, nothing written")
        return 0
    for line in summary_lines(rep):
        print(line)
    if args.predict_only:
        print(f"wrote {rep['out']}/predictions.json, predictions.md (measure later: --measure {rep['out']})")
    else:
        print(f"wrote {rep['out']}/study.json, study.md")
    return 0
