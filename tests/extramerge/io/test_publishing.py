"""Output policy, the parts around publishing: --force replaces only an earlier merge, a failed run
removes the folders it created, concurrent merges to one file publish weights and record together, and a
merge that cannot fit in memory is refused before it starts."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _ckpt_factory import make_safetensors_files
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import extramerge
from extramerge.cli import main
from extramerge.io import writer
from rivervalley.common import resources


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def test_force_replaces_an_earlier_merge_but_never_a_users_file(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=3)
    mine = tmp_path / "mine.safetensors"
    save_file({"w": torch.ones(2)}, str(mine))
    rc, err = _run(capsys, "merge", *run, "--method", "sma", "-o", mine, "--quiet", "--force")
    assert rc == 2 and "not written by an extramerge merge" in err and len(err.splitlines()) == 1
    assert torch.equal(load_file(str(mine))["w"], torch.ones(2))
    out = tmp_path / "merged.safetensors"
    assert _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")[0] == 0
    assert _run(capsys, "merge", *run, "--method", "ema", "-o", out, "--quiet", "--force")[0] == 0
    assert json.loads((tmp_path / "merged.merge.json").read_text())["method"] == "ema"


def test_a_failed_merge_leaves_no_folder_it_created(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=3)
    state = load_file(str(run[-1]))
    state["transformer.ln_f.weight"][0] = float("nan")
    save_file(state, str(run[-1]))
    out = tmp_path / "new" / "deeper" / "merged.safetensors"
    rc, err = _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")
    assert rc == 2 and ("NaN" in err or "non-finite" in err), err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that existed before stays, even when empty
    rc, _ = _run(
        capsys, "merge", *run, "--method", "sma", "-o", tmp_path / "kept" / "m.safetensors", "--quiet"
    )
    assert rc == 2 and (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_concurrent_merges_to_one_file_publish_weights_and_record_together(tmp_path, monkeypatch):
    """The first merge is held between publishing its record and its weights; the second must wait for
    the lock, so the record on disk always belongs to the weights on disk."""
    run = make_safetensors_files(tmp_path / "run", n=3)
    out = tmp_path / "merged.safetensors"
    extramerge.merge(run, method="sma", output=out, progress=False)
    real, order, held = writer.publish, [], threading.Event()

    def slow_publish(src, dst, force, **expect):
        name = threading.current_thread().name
        order.append((name, dst.name))
        if name == "first" and dst.name.endswith(".merge.json"):
            held.set()
            time.sleep(0.5)  # the second merge reaches its publish meanwhile
        real(src, dst, force, **expect)

    monkeypatch.setattr(writer, "publish", slow_publish)

    def merge(method):
        extramerge.merge(run, method=method, output=out, force=True, progress=False)

    first = threading.Thread(target=merge, args=("ema",), name="first")
    first.start()
    held.wait(30)
    second = threading.Thread(target=merge, args=("wma",), name="second")
    second.start()
    first.join(60)
    second.join(60)
    assert [n for n, _ in order] == ["first", "first", "second", "second"], order
    with safe_open(str(out), "pt") as f:
        weights = [float(x) for x in f.metadata()["extramerge.weights"].split(",")]
    record = json.loads((tmp_path / "merged.merge.json").read_text())
    assert record["method"] == "wma" and record["weights"] == weights


def test_two_merge_processes_started_together_leave_weights_and_record_of_one(tmp_path):
    """Issue 21 item 10, as reproduced: two ``extramerge merge ... -o x.safetensors --force`` processes
    with different methods started together, a few trials: the weights' method (in their header) and
    the record's always agree."""
    import subprocess
    import sys
    from subprocess import PIPE

    run = make_safetensors_files(tmp_path / "run", n=3)
    out = tmp_path / "x.safetensors"
    extramerge.merge(run, method="sma", output=out, progress=False)
    cmd = [sys.executable, "-m", "extramerge", "merge", *map(str, run), "-o", str(out), "--force", "--quiet"]
    for _ in range(3):
        procs = [
            subprocess.Popen([*cmd, "--method", m], stdout=subprocess.DEVNULL, stderr=PIPE, text=True)
            for m in ("ema", "wma")
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        with safe_open(str(out), "pt") as f:
            header = f.metadata()
        record = json.loads((tmp_path / "x.merge.json").read_text())
        assert header["extramerge.method"] == record["method"]
        assert [float(x) for x in header["extramerge.weights"].split(",")] == record["weights"]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_merge_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    run = make_safetensors_files(tmp_path / "run", n=3)
    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    out = tmp_path / "merged"
    rc, err = _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")
    assert rc == 2 and err.startswith("extramerge: error: merge to") and "of memory is available" in err
    assert not out.exists()


# ----------------------------------------------------- a failed write leaves nothing behind, parents included


class _Boom(RuntimeError):
    """The failure planted in a writer after it has staged part of its output."""


def _boom(*args, **kwargs):
    raise _Boom("planted failure")


@contextlib.contextmanager
def _one_rank():
    """A torch.distributed group of this process alone (gloo), as torchrun with one process makes."""
    import torch.distributed as dist

    from extramerge import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield distributed.Group(0, 1)
    finally:
        dist.destroy_process_group()


def _fail_analyze(tmp_path, out, monkeypatch):
    from extramerge.trajectory import analyze
    from extramerge.trajectory.data import GramData

    run = make_safetensors_files(tmp_path / "run", n=4)
    real = GramData.save

    def save(self, path):
        real(self, path)  # gram.npz is staged
        raise _Boom("after gram.npz")

    monkeypatch.setattr(GramData, "save", save)
    analyze(run, output=out, progress=False)


def _fail_ranked(tmp_path, out, monkeypatch):
    import numpy as np

    from extramerge.engine.ranked import write_ranked
    from extramerge.io import TensorInfo

    infos = {"a": TensorInfo("a", (4,), "F32"), "b": TensorInfo("b", (4,), "F32")}

    def pieces():
        yield "a", np.ones(4, np.float32)  # written at its offset in the preallocated, staged file
        raise _Boom("after tensor a")

    with _one_rank() as group:
        write_ranked(
            group, [[("a", 0, 4), ("b", 0, 4)]], pieces(), output=out.with_suffix(".safetensors"),
            fmt="safetensors", template=None, infos=infos, shard_size=2**30, metadata=None, record=None,
            force=False, inputs=(), fsync=False,
        )  # fmt: skip


def _fail_lm_checkpoint(tmp_path, out, monkeypatch):
    from extramerge.lm.checkpointing import save_checkpoint

    class Saver:
        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise _Boom("after model.safetensors")

    run = SimpleNamespace(step=7, dir=out.parent, model=Saver(), tokenizer=Saver())
    save_checkpoint(run, 1.0)  # publishes out.parent / "step_000007"


def _fail_lm_data(tmp_path, out, monkeypatch):
    import numpy as np

    from extramerge.lm import data

    real = np.save

    def save(path, arr, *a, **k):
        real(path, arr, *a, **k)  # train.npy is staged
        raise _Boom("after train.npy")

    monkeypatch.setattr(np, "save", save)
    data.prepare("pydoc", out)


def _fail_online_dcp(tmp_path, out, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from extramerge.online import OnlineMerger

    def save(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise _Boom("after one .distcp file")

    monkeypatch.setattr(dcp, "save", save)
    with _one_rank():
        w = distribute_tensor(torch.ones(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])
        merger = OnlineMerger([("w", w)], "ema:0.5")
        merger.update(1)
        merger.save("ema", out)


def _fail_extramerge_file(tmp_path, out, monkeypatch):
    import os

    from extramerge.io import outputs

    monkeypatch.setattr(os, "fsync", _boom)  # after the text is in the staged file
    outputs.write_file(out.with_suffix(".json"), "{}")


def _fail_merge_writer(tmp_path, out, monkeypatch):
    from extramerge.io import TensorInfo, write_checkpoint

    infos = {"a": TensorInfo("a", (4,), "F32"), "b": TensorInfo("b", (4,), "F32")}

    def tensors():
        yield "a", torch.ones(4)
        raise _Boom("after tensor a")

    write_checkpoint(out, tensors(), infos=infos, fmt="safetensors", fsync=False)


def _fail_study(tmp_path, out, monkeypatch):
    import extramerge.study as study_mod

    def run_study(cfg, folder):
        (Path(folder) / "alpha.png").write_bytes(b"half")
        raise _Boom("after alpha.png")

    monkeypatch.setattr(study_mod, "run_study", run_study)
    study_mod.study(study_mod.StudyConfig(checkpoints=[tmp_path / "run"], data=[], out=out))


def _fail_rivervalley_file(tmp_path, out, monkeypatch):
    from rivervalley.common.publish import write_file

    def write(path):
        path.write_text("half")
        raise _Boom("after the staged file")

    write_file(out / "config.json", write)


WRITERS = {
    "trajectory.analyze": _fail_analyze,
    "engine.ranked": _fail_ranked,
    "lm.checkpointing": _fail_lm_checkpoint,
    "lm.data": _fail_lm_data,
    "online.save (DCP)": _fail_online_dcp,
    "io.outputs.write_file": _fail_extramerge_file,
    "io.writer": _fail_merge_writer,
    "study": _fail_study,
    "rivervalley write_file": _fail_rivervalley_file,
}


@pytest.mark.parametrize("writer_name", list(WRITERS))
def test_a_failed_write_leaves_nothing_behind_parents_included(writer_name, tmp_path, monkeypatch):
    """Each writer that stages its output fails after staging part of it, with the output under parent
    folders that did not exist: neither the staging folder nor those parents remain."""
    if writer_name in ("engine.ranked", "online.save (DCP)"):
        import torch.distributed as dist

        if not dist.is_available():
            pytest.skip("torch without distributed")
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(_Boom):
        WRITERS[writer_name](tmp_path, out, monkeypatch)
    assert not (tmp_path / "a").exists(), sorted(map(str, (tmp_path / "a").rglob("*")))
