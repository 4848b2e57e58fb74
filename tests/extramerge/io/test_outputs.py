"""Issue 10 (D, E): outputs never destroy what this package did not write, never land on or in an input
(compared by inode), never replace a special file; SIGTERM/SIGHUP leave no staging folder, and what a
killed run left behind is cleaned by the next run on the same output."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _ckpt_factory import byte_gpt2, make_safetensors_files
from _procs import default_signals

from extramerge.cli import main
from extramerge.io import CheckpointError, outputs
from extramerge.lm.tokenizer import build_tokenizer
from rivervalley.common import publish


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _refused(capsys, *argv, needle: str) -> str:
    rc, err = _run(capsys, *argv)
    # inputs that are hard links warn first (io.safety): the error is the one line left
    lines = [ln for ln in err.strip().splitlines() if "hard links" not in ln]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("extramerge: error: "), err
    assert needle in lines[0], err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def evalrun(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    byte_gpt2(seed=0).save_pretrained(root / "run" / "step_000100")
    build_tokenizer().save_pretrained(root / "run")  # a run folder holding one tokenizer for all steps
    rnd = random.Random(0)
    words = "river valley merge checkpoint noise theory average window offset tensor stream slowly".split()
    docs = [" ".join(rnd.choice(words) for _ in range(200)) + "." for _ in range(4)]
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def _eval(root: Path, *extra) -> list:
    return ["eval", root / "run" / "step_000100", "--data", root / "val.jsonl", "--seq-len", "32", *extra]


# ------------------------------------------------------------------------------------------------- eval


def test_eval_json_needs_force_and_replaces_only_its_own_output(evalrun, tmp_path, capsys):
    out = tmp_path / "eval.json"
    out.write_text('{"mine": 1}\n')
    _refused(capsys, *_eval(evalrun, "--cloze", "0", "--json", out), needle="pass --force")
    _refused(
        capsys, *_eval(evalrun, "--cloze", "0", "--json", out, "--force"), needle="not written by extramerge"
    )
    assert out.read_text() == '{"mine": 1}\n'
    out.unlink()
    assert _run(capsys, *_eval(evalrun, "--cloze", "0", "--json", out))[0] == 0
    first = json.loads(out.read_text())
    assert first["tool"] == "extramerge" and first["kind"] == "eval"
    _refused(capsys, *_eval(evalrun, "--cloze", "0", "--json", out), needle="pass --force")
    assert _run(capsys, *_eval(evalrun, "--cloze", "0", "--json", out, "--force"))[0] == 0
    assert _leftovers(tmp_path) == []


def test_save_cloze_replaces_only_a_cloze_file(evalrun, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text("my notes\n")
    args = _eval(evalrun, "--cloze", "4", "--save-cloze", items)
    _refused(capsys, *args, "--force", needle="not written by extramerge")
    assert items.read_text() == "my notes\n"
    items.unlink()
    assert _run(capsys, *args)[0] == 0
    assert _run(capsys, *args, "--force")[0] == 0  # a cloze item file: replaced with --force


def test_eval_never_writes_onto_or_into_an_input(evalrun, tmp_path, capsys):
    data = evalrun / "val.jsonl"
    alias = tmp_path / "alias.jsonl"
    os.link(data, alias)  # the data file under another name
    before = data.read_bytes()
    for target in (
        data,
        alias,
        evalrun / "run" / "step_000100" / "config.json",
        evalrun / "run" / "tokenizer.json",
    ):
        _refused(capsys, *_eval(evalrun, "--cloze", "0", "--json", target, "--force"), needle="the input")
    _refused(capsys, *_eval(evalrun, "--cloze", "0", "--json", evalrun / "run" / "step_000100" / "x.json"),
             needle="lies inside the input")  # fmt: skip
    items = tmp_path / "items.jsonl"
    assert _run(capsys, *_eval(evalrun, "--cloze", "4", "--save-cloze", items))[0] == 0
    line = _refused(
        capsys, *_eval(evalrun, "--cloze", items, "--save-cloze", items, "--force"), needle="is the input"
    )
    assert str(items) in line
    assert data.read_bytes() == before


def test_force_never_replaces_a_special_file(evalrun, tmp_path, capsys):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    _refused(capsys, *_eval(evalrun, "--cloze", "0", "--json", fifo, "--force"), needle="FIFO")
    run = make_safetensors_files(tmp_path / "run", n=2)
    ff = tmp_path / "merged.safetensors"
    os.mkfifo(ff)
    _refused(capsys, "merge", *run, "--method", "sma", "-o", ff, "--force", "--quiet", needle="FIFO")
    with pytest.raises(CheckpointError, match="character device"):
        outputs.publish(tmp_path / "anything", Path("/dev/null"), force=True)
    assert fifo.exists() and ff.exists()


# ---------------------------------------------------------------------------------------- analyze, merge


def test_analyze_replaces_only_a_folder_it_wrote(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=4)
    out = tmp_path / "report"
    out.mkdir()
    (out / "analysis.json").write_text("{}")  # looks like an analysis, but no marker: not ours
    (out / "thesis.tex").write_text("years of work")
    _refused(capsys, "analyze", *run, "-o", out, "--force", "--quiet", needle="not written by extramerge")
    assert (out / "thesis.tex").read_text() == "years of work"
    fresh = tmp_path / "fresh"
    assert _run(capsys, "analyze", *run, "-o", fresh, "--quiet")[0] == 0
    assert publish.marked(fresh, "kind", "analysis", outputs.MARKER)
    _refused(capsys, "analyze", *run, "-o", fresh, "--quiet", needle="pass --force")  # ours, but no --force
    assert _run(capsys, "analyze", *run, "-o", fresh, "--quiet", "--force")[0] == 0  # an earlier analysis
    assert _leftovers(tmp_path) == []


def test_merge_file_output_keeps_an_unrelated_record_file(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=3)
    out = tmp_path / "X.safetensors"
    mine = tmp_path / "X.merge.json"
    mine.write_text('{"my": "notes"}')
    _refused(capsys, "merge", *run, "--method", "sma", "-o", out, "--force", "--quiet", needle="X.merge.json")
    _refused(
        capsys, "merge", *run, "--method", "sma", "-o", out, "--dry-run", needle="X.merge.json"
    )  # up front
    assert mine.read_text() == '{"my": "notes"}' and not out.exists()
    mine.unlink()
    mine.mkdir()  # a folder where the record goes, even an empty one, is not replaced by the record file
    _refused(capsys, "merge", *run, "--method", "sma", "-o", out, "--force", "--quiet", needle="X.merge.json")
    assert mine.is_dir() and not out.exists()
    mine.rmdir()
    assert _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")[0] == 0
    assert json.loads(mine.read_text())["tool"] == "extramerge"
    assert (
        _run(capsys, "merge", *run, "--method", "wma", "-o", out, "--quiet", "--force")[0] == 0
    )  # ours: replaced


def test_output_inside_an_input_is_caught_by_inode(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=3)
    folders = []
    for p in run:  # folder checkpoints: step_000100/model.safetensors, ...
        (tmp_path / "ckpts" / p.stem).mkdir(parents=True)
        os.link(p, tmp_path / "ckpts" / p.stem / "model.safetensors")
        folders.append(tmp_path / "ckpts" / p.stem)
    link = tmp_path / "link"
    link.symlink_to(folders[-1])
    _refused(
        capsys, "merge", *folders, "--method", "sma", "-o", link / "merged", "--quiet", needle="lies inside"
    )
    hard = tmp_path / "hard.safetensors"
    os.link(run[-1], hard)  # the newest input under another name
    _refused(
        capsys, "merge", *run, "--method", "sma", "-o", hard, "--force", "--quiet", needle="is the input"
    )
    assert outputs.overlap(tmp_path, run[0]) == "contains"
    assert outputs.overlap(link / "x" / "y", folders[0]) is None  # beside an input, not in it
    assert outputs.overlap(link / "model.safetensors", run[-1]) == "is"
    assert outputs.overlap(link / "x" / "y", folders[-1]) == "lies inside"


# ------------------------------------------------------------------------------------------------ signals

_SELF_SIGNAL = """
import os, signal, sys
from extramerge.io import formats
from extramerge.cli import main

real = formats.write_safetensors
def interrupted(*a, **k):
    os.kill(os.getpid(), signal.{sig})  # arrives while the staging folder holds a half-written output
    return real(*a, **k)
formats.write_safetensors = interrupted
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_leave_no_staging_folder(tmp_path, sig):
    run = make_safetensors_files(tmp_path / "run", n=3)
    out = tmp_path / "out" / "merged.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = _SELF_SIGNAL.replace("{sig}", sig)
    cmd = [sys.executable, "-c", code, "merge", *map(str, run), "--method", "sma", "-o", str(out), "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, preexec_fn=default_signals)
    assert p.returncode == 128 + getattr(signal, sig), p.stderr
    assert p.stderr.strip() == f"extramerge: terminated ({sig})"
    assert not out.exists() and not out.parent.exists()  # nor the folder it created for the output


def _dead_pid() -> int:
    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(p.stdout)


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=3)
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = (
        "import os, sys; from pathlib import Path; from rivervalley.common.publish import publishing\n"
        "with publishing(Path(sys.argv[1])) as t:\n"
        "    (t / 'model.safetensors').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(out)], env=env, timeout=60)
    assert p.returncode == -9 and len(_leftovers(tmp_path)) == 1  # what kill -9 leaves
    assert _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--dry-run")[0] == 0
    assert len(_leftovers(tmp_path)) == 1  # a dry run changes nothing on disk
    assert _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")[0] == 0
    assert _leftovers(tmp_path) == []
    # killed between publish's two renames: the old output sits aside and comes back
    tag = f"{_dead_pid()}@{publish.HOST}"
    out.rename(tmp_path / f".merged.old-{tag}-0000")
    assert _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")[0] == 2  # it is back: --force
    assert (out / "merge.json").is_file() and _leftovers(tmp_path) == []
    # an aside copy with a newer output in place is deleted; a live process's staging folder is kept
    (tmp_path / f".merged.old-{tag}-1111").mkdir()
    live = tmp_path / f".merged.tmp-{os.getpid()}@{publish.HOST}-2222"
    live.mkdir()
    assert _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet", "--force")[0] == 0
    assert _leftovers(tmp_path) == [live.name]


_RV_SIGNAL = """
import os, signal, sys
import numpy as np
from rivervalley.cli import main

real = np.savez_compressed
def interrupted(*a, **k):
    real(*a, **k)  # the staging folder now holds a written file
    os.kill(os.getpid(), signal.SIGTERM)
np.savez_compressed = interrupted
sys.exit(main(sys.argv[1:]))
"""


def test_rivervalley_outputs_are_atomic_and_leave_nothing_on_sigterm(tmp_path, capsys):
    from rivervalley import cli as rcli

    out = tmp_path / "sim"
    argv = ["simulate", "--steps", "20", "--seeds", "4", "-o", str(out)]
    assert rcli.main(argv) == 0
    written = {"checkpoints.npz", "loss_curve.csv", "config.json", ".rivervalley-output"}
    assert {p.name for p in out.iterdir()} == written
    (out / "config.json").unlink()
    os.mkfifo(out / "config.json")
    capsys.readouterr()
    assert rcli.main([*argv, "--force"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    (out / "config.json").unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run(
        [sys.executable, "-c", _RV_SIGNAL, *argv, "--force"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 128 + signal.SIGTERM and "rivervalley: terminated (SIGTERM)" in p.stderr
    assert _leftovers(tmp_path) == [] and not (out / "config.json").exists()


def test_study_replaces_only_a_folder_marked_as_a_study(tmp_path):
    from extramerge.study import StudyError, check_output

    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text("{}")  # looks like a study, but no marker
    with pytest.raises(StudyError, match="not an earlier study"):
        check_output(out, [run], force=True)
    publish.mark(out, {"tool": "extramerge", "kind": "study"}, outputs.MARKER)
    assert check_output(out, [run], force=True) == out
    with pytest.raises(StudyError, match="exists"):
        check_output(out, [run], force=False)
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(StudyError, match="the output folder is the input"):
        check_output(link, [run], force=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        check_output(fifo, [run], force=True)


_ANALYZE_SIGNAL = """
import os, signal, sys
from extramerge import trajectory
from extramerge.cli import main

real = trajectory.GramData.save
def interrupted(self, path):
    real(self, path)  # gram.npz is in the staging folder
    os.kill(os.getpid(), signal.SIGHUP)
trajectory.GramData.save = interrupted
sys.exit(main(sys.argv[1:]))
"""


def test_sighup_during_analyze_leaves_no_staging_folder(tmp_path):
    run = make_safetensors_files(tmp_path / "run", n=4)
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", _ANALYZE_SIGNAL, "analyze", *map(str, run), "-o", str(out), "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, preexec_fn=default_signals)
    assert p.returncode == 128 + signal.SIGHUP and p.stderr.strip() == "extramerge: terminated (SIGHUP)"
    assert not out.exists() and _leftovers(tmp_path) == []
