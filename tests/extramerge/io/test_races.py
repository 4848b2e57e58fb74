"""Issue 21 item 4: checks bound to what is used. Where a checkpoint's folder (or the output's parent) is
writable by someone else, a check made on a path and acted on by path again can be raced: the attacker
here is a separate process swapping two entries with renameat2(RENAME_EXCHANGE) as fast as it can
(``_race.swapping``), and a hook that makes the swap land exactly between check and use shows what the
path-bound version did."""

from __future__ import annotations

import inspect
import os
import shutil
import time
from pathlib import Path

import pytest
from _ckpt_factory import make_hf_run
from _race import can_exchange, exchange, swapping

import extramerge
from extramerge.io import CheckpointError, safety

pytestmark = pytest.mark.skipif(not can_exchange("/tmp"), reason="renameat2(RENAME_EXCHANGE) unavailable")

SECRET = "the secret outside the folder\n"
RACE_SECONDS = 1.5


def _side_file_trap(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    """An HF run whose newest folder has notes.txt and, beside it, a link to a secret outside; returns
    (run, notes.txt, the link)."""
    run = make_hf_run(tmp_path / "run", n=2)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    notes = run[-1] / "notes.txt"
    notes.write_text("ordinary notes\n")
    link = run[-1] / ".notes.lnk"  # hidden: not a side file itself
    link.symlink_to(secret)
    return run, notes, link


def test_a_side_file_swapped_for_a_link_after_its_check_is_not_copied(tmp_path, monkeypatch):
    """The hook swaps notes.txt for the link right after the writer's path check passes: checked by path
    and copied by path, the secret went into the output; copied through the checked descriptor, it
    cannot."""
    run, notes, link = _side_file_trap(tmp_path)
    real_inside = safety.inside

    def inside_then_swap(path, root):
        ok = real_inside(path, root)
        copying = any(f.function.startswith("_copy_") for f in inspect.stack(0))  # the writer, not the reader
        if Path(path).name == "notes.txt" and copying and not notes.is_symlink():
            exchange(notes, link)  # the attacker's move, exactly between check and use
        return ok

    monkeypatch.setattr(safety, "inside", inside_then_swap)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="notes.txt: a link that leaves the checkpoint folder"):
        extramerge.merge(run, method="sma", output=out, progress=False)
    assert not out.exists() and not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left


def test_copy_regular_never_copies_the_swapped_in_secret(tmp_path):
    _, notes, link = _side_file_trap(tmp_path)
    folder, dst = notes.parent, tmp_path / "copies"
    dst.mkdir()
    copied = refused = 0
    with swapping(notes, link):
        end = time.monotonic() + RACE_SECONDS
        while time.monotonic() < end:
            target = dst / f"n{copied + refused}"
            try:
                safety.copy_regular(notes, target, root=folder)
                copied += 1
            except CheckpointError:
                refused += 1
            assert not target.exists() or target.read_text() != SECRET
    assert copied > 0 and refused > 0, (copied, refused)  # the attacker did race us, both ways


def test_the_path_bound_copy_was_raceable(tmp_path):
    """What the fix replaces (``regular`` by path, then ``shutil.copyfile`` by path) under the same
    attacker: the secret gets through (a demonstration, so only reported when the attacker loses)."""
    _, notes, link = _side_file_trap(tmp_path)
    folder, dst = notes.parent, tmp_path / "copies"
    dst.mkdir()
    leaked = 0
    with swapping(notes, link):
        end = time.monotonic() + RACE_SECONDS
        while time.monotonic() < end and not leaked:
            target = dst / "n"
            try:
                safety.regular(notes, root=folder)
                shutil.copyfile(notes, target)
            except (CheckpointError, OSError):
                continue
            leaked += target.read_text() == SECRET
            os.unlink(target)
    if not leaked:
        pytest.skip("the attacker never won the path-bound race in the time given")
