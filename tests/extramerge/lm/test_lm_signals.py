"""experiments.lm.train and experiments.lm.study under SIGINT / SIGTERM / SIGHUP: nothing half-saved, no
staging folder left, one line naming where the run stopped and the command that continues it, 128+signal.

These tests pass in any shell: a process started as a background job of a script (``make test &``) inherits
SIGINT ignored, and under ``nohup`` SIGHUP too. So every child here is started with the dispositions the
test relies on (``_start(..., ignore=)``), and the in-process tests set the ones they use and compare the
handlers after the call with those before it."""

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extramerge.lm import checkpointing as lmckpt
from extramerge.lm import cli as lmcli
from extramerge.lm.batches import Batches

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--size", "tiny", "--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "32"]
FAST = [*TINY, "--batch-size", "4", "--threads", "1", "--no-progress", "--eval-batches", "1"]


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _dispositions(ignore=()):
    """For ``preexec_fn``: the child starts with SIGINT, SIGTERM and SIGHUP at their defaults (whatever this
    process inherited), except those in ``ignore``, which it starts ignoring."""

    def set_them():
        for s in STOPS:
            signal.signal(s, signal.SIG_IGN if s in ignore else signal.SIG_DFL)

    return set_them


def _start(cmd: str, *, ignore=()) -> subprocess.Popen:
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "experiments.lm.train"], cmd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, *argv[1:]],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_dispositions(ignore),
    )


@contextlib.contextmanager
def _handlers(**dispositions):
    """Set this process's handlers (``SIGHUP=signal.SIG_DFL``, ...) for the block, then put back the ones
    it had (under nohup SIGHUP is ignored, in a background job SIGINT)."""
    sigs = {getattr(signal, name): h for name, h in dispositions.items()}
    old = {s: signal.signal(s, h) for s, h in sigs.items()}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    """A corpus of ~6-byte documents: nearly every training window starts or ends with EOS (= pad), which
    made transformers warn that the input 'may be padded' (two lines on stderr before the stop line)."""
    import random

    rng = random.Random(0)
    words = "river valley loss merge slope noise lag".split()
    path = tmp_path_factory.mktemp("corpus") / "short.jsonl"
    path.write_text("".join(json.dumps({"text": rng.choice(words)}) + "\n" for _ in range(4000)))
    return path


def _wait_for(p: subprocess.Popen, ready, timeout=60.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _interrupt(p: subprocess.Popen, sig: int) -> tuple[int, str]:
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_signals_stop_training_cleanly_and_the_printed_command_resumes_it(tmp_path, short_docs):
    run = tmp_path / "run"
    resume = run / "resume" / "optimizer.pt"
    # checkpoints at 10 and 80, resume saves at 10, 30, 60, 80
    flags = ["-o", str(run), *FAST, "--steps", "80", "--ckpt-from", "10", "--ckpt-every", "1000"]
    flags += ["--corpus", str(short_docs)]
    p = _start(shlex.join(["python", "-m", "experiments.lm.train", *flags, "--save-every", "30"]))
    _wait_for(p, lambda: (run / "step_000010").is_dir())
    rc, err = _interrupt(p, signal.SIGINT)  # Ctrl-C while the first checkpoint is being saved
    assert rc == 130 and len(err.strip().splitlines()) == 1, err
    assert "stopped by SIGINT at step 10;" in err and "is saved at step 10;" in err, err
    assert _leftovers(tmp_path) == [] and resume.is_file()
    ckpt10 = _sha(run / "step_000010" / "model.safetensors")
    command = err.split("continue with: ", 1)[1].strip()
    assert command.endswith("--save-every 30 --resume")

    p = _start(command)
    first = os.stat(resume).st_ino
    _wait_for(p, lambda: os.stat(resume).st_ino != first)  # the resume save at step 30 is in
    rc, err = _interrupt(p, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and len(err.strip().splitlines()) == 1, err
    m = re.search(r"stopped by SIGTERM at step (\d+); .* is saved at step (\d+); continue with: (.*)$", err)
    assert m and 30 <= int(m[2]) <= int(m[1]) < 80, err
    assert _leftovers(tmp_path) == [] and not (run / "step_000080").exists()
    assert '"status": "interrupted"' in (run / "run.json").read_text()  # not "running"

    p = _start(m[3])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert _leftovers(tmp_path) == [] and (run / "step_000080" / "model.safetensors").is_file()
    assert _sha(run / "step_000010" / "model.safetensors") == ckpt10  # published checkpoints stay intact
    assert '"status": "finished"' in (run / "run.json").read_text()


def _signal_at(monkeypatch, target, name, sig, after=1):
    """``target.name`` sends ``sig`` to this process on its ``after``-th call (then runs as usual)."""
    real, calls = getattr(target, name), []

    def hook(*a, **k):
        calls.append(1)
        if len(calls) == after:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(target, name, hook)


def test_a_signal_before_the_first_save_removes_the_new_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "a"
    _signal_at(monkeypatch, Batches, "next", signal.SIGHUP, after=3)
    argv = ["-o", str(run), *FAST, "--steps", "50", "--ckpt-every", "10"]
    with _handlers(SIGHUP=signal.SIG_DFL):  # not ignored, as under nohup
        before = {s: signal.getsignal(s) for s in STOPS}
        assert lmcli.main(argv) == 128 + signal.SIGHUP
        assert {s: signal.getsignal(s) for s in STOPS} == before  # handlers restored
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped by SIGHUP at step 2, before anything was saved" in err, err
    assert err.strip().endswith("start again with: python -m experiments.lm.train " + shlex.join(argv))
    assert not (tmp_path / "runs").exists()  # the folders this run created are gone


def test_a_run_started_ignoring_sighup_keeps_ignoring_it(tmp_path, monkeypatch, capsys):
    """As under nohup: the SIGHUP at step 2 changes nothing, the run finishes, SIGHUP is still ignored."""
    run = tmp_path / "runs" / "a"
    _signal_at(monkeypatch, Batches, "next", signal.SIGHUP, after=3)
    with _handlers(SIGHUP=signal.SIG_IGN):
        assert lmcli.main(["-o", str(run), *FAST, "--steps", "20", "--ckpt-every", "10"]) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    assert capsys.readouterr().err == "" and (run / "step_000020").is_dir()


def test_a_background_run_ignores_ctrl_c_and_hangups_and_stops_on_sigterm(tmp_path, short_docs):
    """Started ignoring SIGINT (``cmd &`` in a script) and SIGHUP (``nohup``): both are ignored, even while
    a checkpoint is being saved (where signals are held); SIGTERM still stops it cleanly in one line."""
    run = tmp_path / "run"
    flags = ["-o", str(run), *FAST, "--steps", "100000", "--ckpt-from", "10", "--ckpt-every", "10"]
    p = _start(shlex.join(["python", "-m", "experiments.lm.train", *flags, "--corpus", str(short_docs)]),
               ignore=(signal.SIGINT, signal.SIGHUP))  # fmt: skip
    _wait_for(p, lambda: (run / "step_000010").is_dir())
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGHUP)  # a second signal while held raised before, even an ignored one
    _wait_for(p, lambda: (run / "step_000030").is_dir())  # still training
    rc, err = _interrupt(p, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and len(err.strip().splitlines()) == 1, err
    assert "stopped by SIGTERM at step" in err and "continue with: " in err, err
    assert _leftovers(tmp_path) == []


def test_a_signal_during_a_checkpoint_waits_for_its_resume_state(tmp_path, monkeypatch, capsys):
    from extramerge.io import writer

    run = tmp_path / "run"
    # SIGTERM right after the checkpoint at step 10 is published, before its resume state is written
    _signal_at(monkeypatch, lmckpt, "publish", signal.SIGTERM)
    monkeypatch.setattr(writer, "publish", lmckpt.publish)
    flags = [f for f in FAST if f != "--no-progress"]  # with the progress bar: the line goes below it
    argv = ["-o", str(run), *flags, "--steps", "50", "--ckpt-from", "10", "--ckpt-every", "10"]
    assert lmcli.main(argv) == 128 + signal.SIGTERM
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("experiments.lm.train: stopped by SIGTERM at step 10;"), last
    assert "is saved at step 10;" in last, last
    assert sorted(p.name for p in run.iterdir()) == ["data", "log.jsonl", "resume", "run.json", "step_000010"]
    state, meta = lmckpt.read_resume(run / "resume" / lmckpt.RESUME_FILE)
    assert meta["step"] == 10 and [c["step"] for c in meta["checkpoints"]] == [10]


@pytest.mark.usefixtures("default_stops")
def test_deferred_holds_one_signal_until_the_block_ends_and_a_second_raises_at_once():
    from rivervalley.common.publish import Terminated, deferred, interruptible

    before = {s: signal.getsignal(s) for s in STOPS}
    done = []
    with pytest.raises(Terminated, match="SIGTERM"), interruptible():
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("held")
        done.append("delivered late")  # not reached: SIGTERM is raised as the block ends
    assert done == ["held"]
    with pytest.raises(KeyboardInterrupt), interruptible():
        with deferred():
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == ["held"] and {s: signal.getsignal(s) for s in STOPS} == before


@pytest.fixture
def default_stops():
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP have their defaults, whatever was inherited."""
    with _handlers(SIGINT=signal.default_int_handler, SIGTERM=signal.SIG_DFL, SIGHUP=signal.SIG_DFL):
        yield
