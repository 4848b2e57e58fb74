"""Output policy: every file or folder extramerge writes is built beside its destination and renamed into
place (``rivervalley.common.publish.publishing``), and never destroys what it did not write (the one rule
of ``rivervalley.common.publish.refusal``, applied here to extramerge's outputs).

* ``check_output``: an output that is, lies inside or contains an input is refused, compared by device
  and inode (links, bind mounts and '..' spellings cannot hide it) as well as by path; an existing
  non-empty output only with force; what a killed run left beside it is cleaned (or put back) first;
* a special file (FIFO, device, socket) at the destination is never replaced, not even with force
  (``refuse_special``, and ``publish``: the shared rename into place that refuses one);
* ``check_merge_output``: the merge's policy on top of the rule: what ``--force`` may replace is only
  extramerge's own earlier merge (recognised by its merge.json record), never a user's file or folder that
  merely has the name;
* ``MARKER``, ``mark_output`` / ``is_output``: the marker file (``rivervalley.common.publish.mark`` /
  ``marked``, with extramerge's record ``{"tool": "extramerge", "kind": KIND}``) in every folder analyze
  and study write, so only such a folder is ever replaced; ``check_file`` / ``write_file``: a single file
  (eval's JSON, cloze items) replaced only with force and only when ``own`` recognises it as this
  package's earlier output.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from rivervalley.common import publish as _shared
from rivervalley.common.entries import identity, owned
from rivervalley.common.publish import clean_stale, mark, marked, own_json, publishing, refusal

from . import safety
from .errors import CheckpointError
from .layout import WEIGHT_SUFFIXES, record_path
from .safety import kind

__all__ = [
    "MARKER",
    "mark_output",
    "is_output",
    "check_output",
    "check_merge_output",
    "check_record_path",
    "overlap",
    "refuse_special",
    "publish",
    "check_file",
    "write_file",
]

MARKER = ".extramerge-output"  # JSON {"tool": "extramerge", "kind": ...} in folders analyze writes


def mark_output(folder, kind_: str) -> None:
    """Record in ``folder`` that it is extramerge's ``kind_`` output ("analysis", "study"): what a later
    run may replace."""
    mark(folder, {"tool": "extramerge", "kind": kind_}, MARKER)


def is_output(folder, kind_: str) -> bool:
    """Whether ``folder`` (a folder, not a link) carries extramerge's marker for ``kind_``."""
    return marked(folder, "kind", kind_, MARKER)


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
    for name in (out, record_path(out)):  # the record: when the output is a file, X.merge.json beside it
        long = _shared.too_long(name)
        if long is not None:
            raise CheckpointError(
                f"output {safety.shown(output, 60)}: the name {safety.shown(long, 40)} is "
                f"{len(long.encode(errors='surrogateescape'))} bytes; a file system allows {_shared.NAME_MAX}"
            )
    for p in _input_paths(inputs):
        rel = overlap(out, p)
        if rel is not None:
            raise CheckpointError(f"output {output} {rel} the {what} {p}; choose another output")
    if clean:
        clean_stale(out)  # a killed run's aside copy may be the output itself: put it back before checking
    refuse_special(out, output)
    if refusal(out, force, None) == "force":  # whose output it is: check_merge_output, once laid out
        raise CheckpointError(
            f"output {output} exists and is not empty; pass force=True (--force) to replace it"
        )
    if out.is_file() and out.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"output {output} is an existing file, not a checkpoint; choose another output")
    return out


# ------------------------------------------------------------------------------------------ publishing


def publish(src: Path, dst: Path, force: bool, **expect) -> None:
    """``rivervalley.common.publish.publish`` (rename into place, an existing ``dst`` renamed aside first,
    compared with what was checked (``expect=``: its device and inode, see ``check_merge_output``) and
    deleted once the new one is in), refusing a special file at ``dst`` even with force."""
    refuse_special(dst)
    try:
        _shared.publish(src, dst, force, **expect)
    except FileExistsError as e:
        raise CheckpointError(str(e)) from None


# ------------------------------------------------------------------------------------- merge outputs


def check_record_path(output: Path) -> tuple[int, int] | None:
    """X.merge.json beside an output file X.safetensors is replaced only when it is our own record.
    Returns the identity (device, inode) of the record recognised, None when there is none."""
    rec = record_path(output)
    refuse_special(rec)
    # ours is replaced with the output, with or without force; a folder there is not a record
    if refusal(rec, True, _is_record, file=True) is not None:
        raise CheckpointError(
            f"{rec} exists and is not an extramerge record; refusing to replace it (move it, or choose "
            "another output)"
        )
    return _bound(rec, identity(rec) and owned(rec, "tool", "extramerge"))


def check_merge_output(out: Path) -> dict[Path, tuple[int, int] | None]:
    """What ``--force`` may replace: an existing output only when it is extramerge's own earlier merge (a
    folder holding an extramerge merge.json, or a file with its extramerge X.merge.json beside it), never
    a user's folder or file that merely has the name; and X.merge.json only when it is our own record.
    Whether force was given is ``check_output``'s to decide.

    Returns what was checked, path -> (device, inode) or None (absent), for ``publish(..., expect=)``:
    the entry replaced must be the one checked. A folder's identity is that of the folder whose
    merge.json was read (through a descriptor of it), so a folder swapped in and out during the check
    cannot pass for it."""
    checked = {}
    file_out = out.suffix in WEIGHT_SUFFIXES
    if file_out:
        checked[record_path(out)] = check_record_path(out)
    rec = record_path(out)
    why = refusal(out, True, lambda p: _is_record(rec))
    if why == "special":
        refuse_special(out)
    if why is not None:
        raise CheckpointError(
            f"output {out} exists and was not written by an extramerge merge (it has no extramerge "
            f"record {rec.name}); refusing to replace it, even with --force"
        )
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is None or file_out or not stat.S_ISDIR(st.st_mode):  # a file: unlink is all its replacing does
        checked[out] = _bound(out, st and (st.st_dev, st.st_ino), folder=not file_out)
    elif not any(out.iterdir()):  # an empty folder: publish removes it only while empty
        checked[out] = (st.st_dev, st.st_ino)
    else:
        checked[out] = _bound(out, owned(out, "tool", "extramerge", marker="merge.json"))
    return checked


def _is_record(path: Path) -> bool:
    return own_json(path, "tool", "extramerge")


def _bound(path: Path, ident: tuple[int, int] | None, *, folder: bool = True) -> tuple[int, int] | None:
    """``ident``, the identity of ``path`` as checked, when ``path`` is still that entry (and, unless
    ``folder``, not a folder): otherwise it changed during the check (someone else writes its folder)."""
    now = identity(path)
    if now != ident or (not folder and now is not None and os.path.isdir(path) and not path.is_symlink()):
        raise CheckpointError(f"output {path} changed while it was being checked; run again")
    return ident


# ---------------------------------------------------------------------------------------- single files


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
    """Write ``text`` to the file ``path`` atomically (``publishing``), after ``check_file(path,
    **policy)``."""
    out = check_file(path, **policy)
    with publishing(out, force=True, file=True, commit=publish) as tmp:  # force: vetted by check_file
        (tmp / out.name).write_text(text, encoding="utf-8")
        with open(tmp / out.name, "rb") as f:
            os.fsync(f.fileno())
    return out
