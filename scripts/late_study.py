"""The late-stage study, pre-registered (issue "Late-stage evidence, pre-registered").

    python scripts/late_study.py halves  [--runs ../runs/late]        # the calibration half (only)
    python scripts/late_study.py predict [--runs ../runs/late]        # every cell: predictions.json
    git add results/late/predictions && git commit                     # the predictions, before measuring
    python scripts/late_study.py measure [--runs ../runs/late]        # the test half, then every cell

A *cell* is (run, phase, spacing s): 16 checkpoints s steps apart ending at the end of the constant phase
(step 19 200, phase ``constant``) or at the end of the run (step 24 000, phase ``decay``: across the WSD
decay), fewer where the run has fewer. Each cell is studied by ``extramerge study --predict-only`` on the
calibration half, with ``--forecast-from`` at its 8th checkpoint (the first half) and the learning rate
from the run's log; ``measure`` runs ``extramerge study --measure`` on the measurement half.

Held-out halves: the run's own val and test splits are gcide pieces (2–4 KB, disjoint from the training
text by piece); each half takes the first ``--docs`` pieces of its split in the order of the SHA-256 of
their text (80 pieces ≈ 170 k tokens). The measurement half is written only by ``measure``, after the
predictions: ``predict`` never reads the test split. Every run shares one data split (same corpus and
split rule: ``data/meta.json``'s content hash), checked here.

Outputs: results/late/predictions/<run>/<phase>-s<s>/ (predictions.json, predictions.md) and
results/late/measured/<run>/<phase>-s<s>/ (study.json, study.md, alpha.png); results/late/halves.json.
Runs that are not finished are skipped with a message; cells already done are kept (--force redoes them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ("gpt2-adamw-s0", "gpt2-adamw-s1", "gpt2-adamw-s2", "llama-muon-s0")
SPACINGS = (100, 200, 400, 800)
PHASES = {"constant": 19_200, "decay": 24_000}
N_CKPT = 16
KNOBS = ["--threads", "2", "--quiet"]


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _half(split: Path, n_docs: int) -> list[str]:
    """The first n_docs documents of a split's JSONL in the order of their SHA-256."""
    docs = [json.loads(line)["text"] for line in split.read_text(encoding="utf-8").splitlines() if line]
    docs = sorted(set(docs), key=_hash_text)
    if len(docs) < n_docs:
        sys.exit(f"{split}: {len(docs)} distinct documents, fewer than --docs {n_docs}")
    return docs[:n_docs]


def _write_half(runs: Path, which: str, n_docs: int) -> Path:
    """Write halves/<which>.jsonl from the first finished run's split (every run has the same split)."""
    metas = {}
    for name in RUNS:
        meta = runs / name / "data" / "meta.json"
        if meta.is_file():
            metas[name] = json.loads(meta.read_text())["content_hash"]
    if len(set(metas.values())) != 1:
        sys.exit(f"the runs do not share one data split: {metas}")
    src = runs / next(iter(metas)) / "data" / ("val.jsonl" if which == "calib" else "test.jsonl")
    docs = _half(src, n_docs)
    out = runs / "halves" / f"{which}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    os.replace(tmp, out)
    record = ROOT / "results/late/halves.json"
    rec = json.loads(record.read_text()) if record.is_file() else {}
    rec[which] = {
        "source": f"{src.parent.parent.name}/data/{src.name}",
        "rule": f"first {n_docs} distinct pieces by SHA-256 of their text",
        "documents": len(docs),
        "bytes": sum(len(d.encode()) for d in docs),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "data_content_hash": next(iter(metas.values())),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=1) + "\n")
    print(
        f"wrote {out}: {len(docs)} documents, {rec[which]['bytes']} bytes, sha256 {rec[which]['sha256'][:12]}"
    )
    return out


def cells(runs: Path):
    """(run name, phase, spacing, checkpoint folders) of every cell of the finished runs."""
    for name in RUNS:
        run = runs / name
        status = (
            json.loads((run / "run.json").read_text()).get("status") if (run / "run.json").is_file() else None
        )
        if status != "finished":
            print(f"{name}: not finished ({status}); skipped", file=sys.stderr)
            continue
        have = {int(p.name.split("_")[1]): p for p in run.glob("step_*") if p.is_dir()}
        for phase, end in PHASES.items():
            for s in SPACINGS:
                steps = [end - s * i for i in range(N_CKPT)][::-1]
                ckpts = [have[t] for t in steps if t in have]
                yield name, phase, s, ckpts


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def predict(runs: Path, force: bool) -> None:
    calib = runs / "halves" / "calib.jsonl"
    if not calib.is_file():
        sys.exit(f"{calib}: missing; run `python scripts/late_study.py halves` first")
    for name, phase, s, ckpts in cells(runs):
        out = ROOT / "results/late/predictions" / name / f"{phase}-s{s}"
        if (out / "predictions.json").is_file() and not force:
            continue
        fc = ckpts[len(ckpts) // 2 - 1].name.split("_")[1]  # the first half: up to the 8th of 16
        cmd = [sys.executable, "-m", "extramerge", "study", *map(str, ckpts), "--calib", str(calib)]
        cmd += ["--lr-schedule", str(runs / name / "log.jsonl"), "--forecast-from", str(int(fc))]
        _run([*cmd, "--predict-only", "--force", "-o", str(out), *KNOBS])


def measure(runs: Path, n_docs: int, force: bool) -> None:
    test = runs / "halves" / "test.jsonl"
    if not test.is_file():
        test = _write_half(runs, "test", n_docs)
    for name, phase, s, _ in cells(runs):
        pred = ROOT / "results/late/predictions" / name / f"{phase}-s{s}"
        out = ROOT / "results/late/measured" / name / f"{phase}-s{s}"
        if not (pred / "predictions.json").is_file():
            print(f"{pred}: no predictions; skipped", file=sys.stderr)
            continue
        if (out / "study.json").is_file() and not force:
            continue
        _run(
            [
                sys.executable,
                "-m",
                "extramerge",
                "study",
                "--measure",
                str(pred),
                "--test",
                str(test),
                "--force",
                "-o",
                str(out),
                *KNOBS,
            ]
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["halves", "predict", "measure"])
    p.add_argument("--runs", type=Path, default=ROOT.parent / "runs/late")
    p.add_argument("--docs", type=int, default=80, help="documents per half (default 80)")
    p.add_argument("--force", action="store_true", help="redo cells already done")
    a = p.parse_args(argv)
    if a.step == "halves":
        _write_half(a.runs, "calib", a.docs)
    elif a.step == "predict":
        predict(a.runs, a.force)
    else:
        measure(a.runs, a.docs, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
