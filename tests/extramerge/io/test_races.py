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


# ------------------------------------------------------------- --force replaces only the output it checked


def _merge_and_user_folder(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    """Inputs, an earlier merge at ``out`` (what --force may replace), and a user's folder beside it
    holding a file the attacker would have deleted."""
    from _ckpt_factory import make_safetensors_files

    run = make_safetensors_files(tmp_path / "run", n=2)
    out = tmp_path / "out"
    extramerge.merge(run, method="sma", output=out, progress=False)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work\n")
    return run, out, user


def _alive(fd: int) -> bool:
    """Whether the file or folder open as ``fd`` still has a name (a deleted one has no link left)."""
    return os.fstat(fd).st_nlink > 0


def test_a_folder_swapped_in_after_the_force_check_is_not_deleted(tmp_path, monkeypatch):
    """The hook swaps the user's folder in right after the check under the output lock: renamed aside and
    deleted by path, it was lost; compared by (device, inode) after the rename, it is put back."""
    from extramerge.io import writer

    run, out, user = _merge_and_user_folder(tmp_path)
    real = writer.check_merge_output

    def check_then_swap(path):
        checked = real(path)
        if inspect.stack(0)[1].function == "publish_checkpoint":  # the check under the lock, not the first
            exchange(out, user)
        return checked

    monkeypatch.setattr(writer, "check_merge_output", check_then_swap)
    with pytest.raises(CheckpointError, match="changed while it was being replaced"):
        extramerge.merge(run, method="ema", output=out, force=True, progress=False)
    assert (out / "thesis.tex").read_text() == "years of work\n"  # put back where the attacker left it
    assert (user / "merge.json").is_file()  # and the earlier merge where it was moved to


def test_force_never_deletes_a_folder_swapped_in_by_an_attacker(tmp_path):
    run, out, user = _merge_and_user_folder(tmp_path)
    thesis = os.open(user / "thesis.tex", os.O_RDONLY)
    done = refused = 0
    try:
        with swapping(out, user):
            end = time.monotonic() + RACE_SECONDS
            while time.monotonic() < end:
                try:
                    extramerge.merge(run, method="sma", output=out, force=True, progress=False)
                    done += 1
                except CheckpointError:
                    refused += 1
                assert _alive(thesis), (done, refused)
    finally:
        os.close(thesis)
    assert done + refused > 3, (done, refused)


def test_publish_compares_what_it_renamed_aside(tmp_path):
    """``publish`` at the unit level: the entry renamed aside must be the one checked."""
    from rivervalley.common.entries import identity
    from rivervalley.common.publish import publish

    dst, other, src = tmp_path / "dst", tmp_path / "other", tmp_path / "src"
    for p in (dst, other, src):
        p.mkdir()
        (p / "f").write_text(p.name)
    checked = identity(dst)
    exchange(dst, other)  # after the check
    with pytest.raises(FileExistsError, match="changed while it was being replaced"):
        publish(src, dst, True, expect=checked)
    assert (dst / "f").read_text() == "other" and (other / "f").read_text() == "dst"
    assert (src / "f").read_text() == "src"
    publish(src, dst, True, expect=identity(dst))  # checked now: replaced
    assert (dst / "f").read_text() == "src" and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "other"]
