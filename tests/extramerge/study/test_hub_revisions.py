"""The study of a public trajectory: revisions of one hub repository in huggingface_hub's cache, offline.

The cache is built here as huggingface_hub lays it out (``models--org--name/{blobs,refs,snapshots/<commit>}``,
snapshot files linking to ``../../blobs/<hash>``, ``refs/<branch>`` holding the commit), from tiny byte-level
GPT-2 checkpoints written by ``save_pretrained``; huggingface_hub's own ``try_to_load_from_cache`` finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import byte_gpt2, cycle_docs

pytest.importorskip("huggingface_hub")

REPO = "river-org/tiny-trajectory"
STEPS = (100, 200, 300, 400, 500)
FAST = ["--quiet", "--threads", "1", "--window", "2", "--offsets", "2", "--alphas=0.5,1", "--quick"]


def _write_run(root: Path) -> dict[str, Path]:
    """checkpoint folders θ_k = θ_0 + k·0.02·v + 0.01·ε_k with the byte tokenizer, by revision name."""
    from extramerge.lm.tokenizer import build_tokenizer

    model = byte_gpt2(seed=0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    drift = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    tok = build_tokenizer()
    out = {}
    for k, step in enumerate(STEPS, 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + k * 0.02 * drift[name] + 0.01 * torch.randn(p.shape, generator=g))
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[f"step{step}"] = folder
    return out


def _cache_repo(cache: Path, repo: str, revisions: dict[str, Path]) -> Path:
    """Lay ``revisions`` (name -> folder) out as huggingface_hub's cache does; returns the repo folder."""
    base = cache / ("models--" + repo.replace("/", "--"))
    for rev, folder in revisions.items():
        commit = hashlib.sha1(rev.encode()).hexdigest()
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        (base / "blobs").mkdir(exist_ok=True)
        for f in sorted(folder.iterdir()):
            data = f.read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            (base / "blobs" / blob).write_bytes(data)
            (snap / f.name).symlink_to(f"../../blobs/{blob}")
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / rev).write_text(commit)
    return base


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    folders = _write_run(tmp / "run")
    cache = tmp / "cache"
    repo_dir = _cache_repo(cache, REPO, folders)
    data = tmp / "text.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in cycle_docs(16, n_words=120)))
    return dict(cache=cache, repo_dir=repo_dir, run=tmp / "run", data=data, folders=folders)


@pytest.fixture
def cached(hub, monkeypatch):
    """huggingface_hub reads its cache location at import: point the imported constant there too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    return hub


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(cached):
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    found = try_to_load_from_cache(REPO, "config.json", revision="step300")
    assert isinstance(found, str) and Path(found).is_file()
    snap = Path(snapshot_download(REPO, revision="step300", local_files_only=True))
    assert snap.parent.name == "snapshots" and (snap / "model.safetensors").is_symlink()


def test_revisions_parse_lists_and_ranges():
    from extramerge.io import CheckpointError
    from extramerge.study.hub import parse_revisions

    assert parse_revisions("step140000,step141000") == ["step140000", "step141000"]
    assert parse_revisions("step140000:step143000:1000") == [f"step{s}" for s in range(140000, 143001, 1000)]
    assert parse_revisions("step_000100:step_000300:100, main") == [
        "step_000100",
        "step_000200",
        "step_000300",
        "main",
    ]
    assert parse_revisions("step1:step10:4") == ["step1", "step5", "step9"]
    for bad, why in [
        ("", "no revisions"),
        ("step1:iter5:1", "one prefix"),
        ("step5:step1:1", "START <= STOP"),
        ("step1:step5:0", "stride"),
        ("step1,step1", "named twice"),
        ("step0:step100000000:1", "more than"),
        ("a b", "not a revision name"),
    ]:
        with pytest.raises(CheckpointError, match=why):
            parse_revisions(bad)


def test_study_of_cached_revisions_equals_the_study_of_the_same_folders(cached, tmp_path, capsys):
    from extramerge.cli import main as em_main

    def study(args, out):
        rc = em_main(["study", *args, "--data", str(cached["data"]), "-o", str(out), *FAST])
        assert rc == 0, capsys.readouterr().err
        return json.loads((out / "study.json").read_text())

    by_hub = study([REPO, "--revisions", "step100:step500:100"], tmp_path / "hub")
    by_folder = study([str(cached["run"])], tmp_path / "local")
    assert by_hub["checkpoints"]["steps"] == list(STEPS)
    assert all(Path(p).parent.name == "snapshots" for p in by_hub["checkpoints"]["paths"])
    assert by_hub["calibration"]["losses"] == by_folder["calibration"]["losses"]
    assert by_hub["recommendation"]["weights"] == by_folder["recommendation"]["weights"]
    # the same revisions given as REPO@rev, in any order: the steps in their names order them
    refs = [f"{REPO}@step{s}" for s in reversed(STEPS)]
    assert study(refs, tmp_path / "refs")["calibration"]["losses"] == by_hub["calibration"]["losses"]


def test_revisions_without_steps_are_ordered_as_given(cached):
    from extramerge.study.inputs import read_checkpoints

    repo_dir = cached["repo_dir"]
    for i, rev in enumerate(("v-alpha", "v-beta", "main")):  # tags/branches naming no step
        (repo_dir / "refs" / rev).write_text((repo_dir / "refs" / f"step{STEPS[-3 + i]}").read_text())
    try:
        ckpts, _ = read_checkpoints([f"{REPO}@v-beta", f"{REPO}@v-alpha", REPO])  # REPO alone: main
        try:
            assert [c.step for c in ckpts] == [1, 2, 3]
            assert [c.name for c in ckpts] == [f"{REPO}@v-beta", f"{REPO}@v-alpha", f"{REPO}@main"]
        finally:
            for c in ckpts:
                c.close()
    finally:
        for rev in ("v-alpha", "v-beta", "main"):
            (repo_dir / "refs" / rev).unlink()


def test_recorded_snapshot_folders_find_their_steps_again(cached):
    """A study records the snapshot folders it read; given back (``--measure``'s default), they open with
    the repository folder as their root and the steps their refs name."""
    from extramerge.study.inputs import read_checkpoints

    ckpts, _ = read_checkpoints([f"{REPO}@step{s}" for s in STEPS])
    paths = [c.path for c in ckpts]
    for c in ckpts:
        c.close()
    again, _ = read_checkpoints(paths)
    try:
        assert [c.step for c in again] == list(STEPS)
    finally:
        for c in again:
            c.close()


def _one_line_exit_2(argv, out, capsys) -> str:
    from extramerge.cli import main as em_main

    rc = em_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp" in p.name]
    return err[0]


def test_bad_revisions_are_one_line_exit_2_nothing_written(cached, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--data", str(cached["data"]), "-o", str(out), *FAST]
    err = _one_line_exit_2(["study", REPO, "--revisions", "step100:step600:100", *base], out, capsys)
    assert f"{REPO}@step600" in err and "not in the Hugging Face cache" in err and "hf download" in err
    err = _one_line_exit_2(["study", "other-org/none", "--revisions", "step100", *base], out, capsys)
    assert "other-org/none@step100" in err
    err = _one_line_exit_2(["study", str(cached["run"]), "--revisions", "step100", *base], out, capsys)
    assert "--revisions" in err and "Hub repository" in err
    err = _one_line_exit_2(["study", REPO, "--revisions", "step1:step3", *base], out, capsys)
    assert "--revisions" in err and "START:STOP:STRIDE" in err
    # beside local checkpoints, a revision must name its step
    (cached["repo_dir"] / "refs" / "main").write_text((cached["repo_dir"] / "refs" / "step500").read_text())
    try:
        err = _one_line_exit_2(["study", str(cached["folders"]["step100"]), REPO, *base], out, capsys)
        assert f"{REPO}@main" in err and "no training step" in err
    finally:
        (cached["repo_dir"] / "refs" / "main").unlink()


def test_a_snapshot_link_leaving_the_repository_folder_is_still_refused(cached, tmp_path, capsys):
    """The repository's cache folder bounds the reads: a snapshot file linking outside it is refused."""
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(REPO, revision="step500", local_files_only=True))
    outside = tmp_path / "secret.json"
    outside.write_text((snap / "config.json").read_text())
    cfg = snap / "config.json"
    target = os.readlink(cfg)
    cfg.unlink()
    cfg.symlink_to(outside)
    out = tmp_path / "o"
    try:
        err = _one_line_exit_2(
            ["study", REPO, "--revisions", "step100:step500:100", "--data", str(cached["data"]),
             "-o", str(out), *FAST],
            out,
            capsys,
        )  # fmt: skip
        assert "config.json" in err and "leaves" in err
    finally:
        cfg.unlink()
        cfg.symlink_to(target)


def test_missing_revision_offline_in_a_fresh_process(hub, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them: the CLI finds the cache, names what is missing."""
    out = tmp_path / "o"
    env = {**os.environ, "HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1"}
    argv = [
        "study",
        REPO,
        "--revisions",
        "step400,step500,step700",
        "--data",
        str(hub["data"]),
        "-o",
        str(out),
    ]
    p = subprocess.run(
        [sys.executable, "-m", "extramerge", *argv, *FAST],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and f"{REPO}@step700" in lines[0], p.stderr
    assert str(hub["cache"]) in lines[0] and not out.exists()
