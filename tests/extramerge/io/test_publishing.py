"""Output policy, the parts around publishing: --force replaces only an earlier merge, a failed run
removes the folders it created, concurrent merges to one file publish weights and record together, and a
merge that cannot fit in memory is refused before it starts."""

from __future__ import annotations

import json
import threading
import time

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

    def slow_publish(src, dst, force):
        name = threading.current_thread().name
        order.append((name, dst.name))
        if name == "first" and dst.name.endswith(".merge.json"):
            held.set()
            time.sleep(0.5)  # the second merge reaches its publish meanwhile
        real(src, dst, force)

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


def test_a_merge_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path, capsys, monkeypatch):
    run = make_safetensors_files(tmp_path / "run", n=3)
    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    out = tmp_path / "merged"
    rc, err = _run(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")
    assert rc == 2 and err.startswith("extramerge: error: merge to") and "of memory is available" in err
    assert not out.exists()
