"""Output policy: every file or folder extramerge writes is built beside its destination and renamed into
place, and never destroys what it did not write.

* ``check_output``: an output that is, lies inside or contains an input is refused, compared by device
  and inode (links, bind mounts and '..' spellings cannot hide it) as well as by path;
* a special file (FIFO, device, socket) at the destination is never replaced, not even with force;
* ``staging_dir`` / ``publish`` / ``clean_stale`` (from ``rivervalley.common.publish``, shared with
  rivervalley's own outputs): build in ``.NAME.tmp-PID@HOST-*`` beside the output, rename into place
  (an existing output renamed aside first, deleted once the new one is in); leftovers of a killed run on the
  same output are cleaned by the next one;
* ``check_merge_output``: what ``--force`` may replace of a merge's output: only extramerge's own earlier
  merge (recognised by its merge.json record), never a user's file or folder that merely has the name;
* ``mark`` / ``marked``: a marker file in every folder this package writes for analyze, so only such a
  folder is ever replaced; ``check_file`` / ``write_file``: a single file (eval's JSON, cloze items)
  replaced only with force and only when ``own`` recognises it as this package's earlier output;
* ``interruptible`` (also from ``rivervalley.common.publish``): SIGTERM and SIGHUP raise ``Terminated`` (a
  KeyboardInterrupt), so they take the same clean-up path as Ctrl-C and leave no staging folder behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from rivervalley.common import publish as _shared
from rivervalley.common.publish import Terminated, clean_stale, discard, interruptible, locked, staging_dir

from .errors import CheckpointError
from .layout import WEIGHT_SUFFIXES, record_path
from .safety import kind, load_json

__all__ = [
    "MARKER",
    "Terminated",
    "check_output",
    "check_merge_output",
    "check_record_path",
    "overlap",
    "refuse_special",
    "staging_dir",
    "discard",
    "locked",
    "publish",
    "clean_stale",
    "mark",
    "marked",
    "own_json",
    "check_file",
    "write_file",
    "interruptible",
]

MARKER = ".extramerge-output"  # JSON {"tool": "extramerge", "kind": ...} in folders analyze writes


# ----------------------------------------------------------------------------------------- inputs vs output


def _id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestor_ids(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of every existing strict ancestor of ``path``, as spelled and as resolved."""
    ids = set()
    for p in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
        ids.update(i for i in map(_id, p.parents) if i is not None)
    return ids


def overlap(output: Path, input_path: Path) -> str | None:
    """'is', 'lies inside' or 'contains' when ``output`` overlaps ``input_path`` (by path or by inode)."""
    out, p = Path(os.path.abspath(output)), Path(os.path.abspath(input_path))
    if out == p or out.is_relative_to(p) or p.is_relative_to(out):
        return "is" if out == p else "lies inside" if out.is_relative_to(p) else "contains"
    out_id, in_id = _id(out), _id(p)
    if in_id is None:
        return None
    if out_id == in_id:
        return "is"
    if in_id in _ancestor_ids(out):
        return "lies inside"
    if out_id is not None and os.path.isdir(out) and out_id in _ancestor_ids(p):
        return "contains"
    return None


def _input_paths(inputs: Iterable) -> list[Path]:
    paths: list[Path] = []
    for ck in inputs:
        files = getattr(ck, "files", None)  # a Checkpoint: its path and weight files
        paths += [Path(ck.path), *map(Path, files)] if files is not None else [Path(ck)]
    return paths


def refuse_special(path: Path, output: object = None) -> None:
    """Refuse a destination that is a FIFO, device or socket: force never replaces one."""
    mode = _shared.special_mode(path)
    if mode is not None:
        raise CheckpointError(
            f"output {output or path} is {kind(mode)}; refusing to replace it, even with --force"
        )


def check_output(output, inputs: Iterable = (), *, force=False, what="input checkpoint", clean=True) -> Path:
    """Refuse an output that is, contains or lies inside an input, that is a special file, or that exists
    (non-empty) without force. Returns the absolute output path. ``clean``: first remove (or put back)
    what a killed run left beside it (off for a dry run, which changes nothing)."""
    out = Path(os.path.abspath(output))
    for p in _input_paths(inputs):
        rel = overlap(out, p)
        if rel is not None:
            raise CheckpointError(f"output {output} {rel} the {what} {p}; choose another output")
    if clean:
        clean_stale(out)  # a killed run's aside copy may be the output itself: put it back before checking
    refuse_special(out, output)
    if out.exists() and not force:
        if out.is_file() or out.is_symlink() or any(out.iterdir()):
            raise CheckpointError(
                f"output {output} exists and is not empty; pass force=True (--force) to replace it"
            )
    if out.is_file() and out.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"output {output} is an existing file, not a checkpoint; choose another output")
    return out


# ------------------------------------------------------------------------------------ staging and publishing


def publish(src: Path, dst: Path, force: bool) -> None:
    """``rivervalley.common.publish.publish`` (rename into place, an existing ``dst`` renamed aside first and
    deleted once the new one is in), refusing a special file at ``dst`` even with force."""
    refuse_special(dst)
    try:
        _shared.publish(src, dst, force)
    except FileExistsError as e:
        raise CheckpointError(str(e)) from None


# ------------------------------------------------------------------------------------- merge outputs


def check_record_path(output: Path) -> None:
    """X.merge.json beside an output file X.safetensors is replaced only when it is our own record."""
    rec = record_path(output)
    refuse_special(rec)
    if (rec.exists() or rec.is_symlink()) and (rec.is_symlink() or not _is_record(rec)):
        raise CheckpointError(
            f"{rec} exists and is not an extramerge record; refusing to replace it (move it, or choose "
            "another output)"
        )


def check_merge_output(out: Path) -> None:
    """What ``--force`` may replace: an existing output only when it is extramerge's own earlier merge (a
    folder holding an extramerge merge.json, or a file with its extramerge X.merge.json beside it), never
    a user's folder or file that merely has the name; and X.merge.json only when it is our own record."""
    if out.suffix in WEIGHT_SUFFIXES:
        check_record_path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    rec = record_path(out)
    if out.is_symlink() or not _is_record(rec):
        raise CheckpointError(
            f"output {out} exists and was not written by an extramerge merge (it has no extramerge "
            f"record {rec.name}); refusing to replace it, even with --force"
        )


def _is_record(path: Path) -> bool:
    return own_json(path, "tool", "extramerge")


# ---------------------------------------------------------------------------------------- ownership


def mark(folder: Path, kind_: str) -> None:
    """Write the marker that tells a later run this folder is extramerge's own ``kind_`` output."""
    (folder / MARKER).write_text(json.dumps({"tool": "extramerge", "kind": kind_}) + "\n")


def own_json(path: Path, key: str, value: str) -> bool:
    """Whether ``path`` is a small regular file holding a JSON object with ``key`` = ``value``."""
    try:
        doc = load_json(path, limit=2**20) if os.stat(path).st_size <= 2**20 else None
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get(key) == value


def marked(folder: Path, kind_: str) -> bool:
    """Whether ``folder`` (not a link) carries this package's marker for ``kind_``."""
    return folder.is_dir() and not folder.is_symlink() and own_json(folder / MARKER, "kind", kind_)


def check_file(
    path, *, force: bool = False, own: Callable[[Path], bool] = lambda p: False, inputs: Iterable = ()
) -> Path:
    """Refuse writing the file ``path`` when it is, lies inside or contains one of ``inputs`` (by inode),
    is a folder or special file, or exists and either ``force`` is off or ``own(path)`` does not recognise
    it as this package's earlier output. Returns the absolute path."""
    out = Path(os.path.abspath(path))
    for p in _input_paths(inputs):
        rel = overlap(out, p)
        if rel is not None:
            raise CheckpointError(f"output {path} {rel} the input {p}; choose another output")
    clean_stale(out)
    refuse_special(out, path)
    try:
        _shared.claim_file(out, force, own, tool="extramerge")  # a folder, or not ours: refused
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return out


def write_file(path, text: str, **policy) -> Path:
    """Write ``text`` to the file ``path`` atomically (staging_dir + publish), after ``check_file(path,
    **policy)``."""
    out = check_file(path, **policy)
    tmp = staging_dir(out)
    try:
        (tmp / out.name).write_text(text, encoding="utf-8")
        with open(tmp / out.name, "rb") as f:
            os.fsync(f.fileno())
        publish(tmp / out.name, out, force=True)  # vetted by check_file
    finally:
        discard(tmp)
    return out
