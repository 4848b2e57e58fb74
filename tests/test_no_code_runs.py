"""Issue 10 (B): data never runs code. Resume files load with weights_only=True; no loader in the
repository unpickles arbitrary objects; the compiled-kernel cache is private whatever the umask."""

import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from extramerge.lm.config import TrainConfig
from extramerge.lm.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=4, threads=1, progress=False)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_loads_weights_only_and_refuses_pickled_code(tmp_path):
    cfg = dict(out=str(tmp_path / "run"), steps=6, ckpt_every=3, **TINY)
    train(TrainConfig(**cfg, stop_at=3))
    resume = tmp_path / "run" / "resume" / "optimizer.pt"
    train(TrainConfig(**cfg, resume=True))  # the file the trainer writes loads weights-only
    marker = tmp_path / "marker"
    with open(resume, "wb") as f:
        pickle.dump({"meta": _Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="not a resume file of this trainer"):
        train(TrainConfig(**cfg, resume=True))
    assert not marker.exists()


def test_no_loader_in_the_repository_unpickles_arbitrary_objects():
    bad = ("weights_only=" + "False", "pickle." + "load", "allow_pickle=" + "True", "dill." + "load")
    hits = []
    for p in REPO.rglob("*.py"):
        if any(
            part.startswith(".") or part in ("build", "out", "runs") for part in p.relative_to(REPO).parts
        ):
            continue
        text = p.read_text(errors="replace")
        hits += [f"{p.relative_to(REPO)}: {b}" for b in bad if b in text]
    assert not hits


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
def test_kernel_cache_is_private_under_umask_000(tmp_path):
    cache = tmp_path / "a" / "b" / "cache"
    code = (
        "import os; os.umask(0)\n"
        "from rivervalley import _native\n"
        "lib, detail = _native._load()\n"
        "assert lib is not None, detail\n"
        "print(detail)\n"
    )
    env = {**os.environ, "RIVERVALLEY_CACHE": str(cache), "RIVERVALLEY_NATIVE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert str(cache) in p.stdout
    for d in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    (so,) = cache.glob("noise-*.so")
    assert stat.S_IMODE(so.stat().st_mode) & 0o077 == 0


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
def test_a_library_others_can_write_is_not_loaded(tmp_path, monkeypatch):
    from rivervalley import _native

    cache = tmp_path / "cache"
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(cache))
    monkeypatch.setenv("RIVERVALLEY_NATIVE", "1")
    assert _native._load()[0] is not None
    (so,) = cache.glob("noise-*.so")
    so.chmod(0o777)
    fallback = tmp_path / "tmp"
    fallback.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(fallback))
    lib, detail = _native._load()
    assert lib is not None and str(fallback) in detail  # skipped, built afresh in the private fallback


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a link owned by another user")
def test_a_cache_link_owned_by_another_user_is_refused(tmp_path):
    from rivervalley import _native

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(mine)
    _native._check_private(link)  # our own link to our own private folder: fine
    os.lchown(link, 4242, 4242)  # planted by someone else (as in a shared /tmp)
    with pytest.raises(OSError, match="not private to this user"):
        _native._check_private(link)
