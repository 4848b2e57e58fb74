"""Output policy: every file or folder extramerge writes is built beside its destination and renamed into
place, and never destroys what it did not write.

* ``check_output``: an output that is, lies inside or contains an input is refused, compared by device
  and inode (links, bind mounts and '..' spellings cannot hide it) as well as by path;
* a special file (FIFO, device, socket) at the destination is never replaced, not even with force;
* ``staging_dir`` / ``publish``: build in ``.NAME.tmp-PID@HOST-*`` beside the output, rename into place
  (an existing output renamed aside to ``.NAME.old-PID@HOST-*`` first, deleted once the new one is in);
  leftovers of a killed run on the same output are cleaned by the next one (``clean_stale``);
* ``mark`` / ``marked``: a marker file in every folder this package writes for analyze, so only such a
  folder is ever replaced; ``check_file`` / ``write_file``: a single file (eval's JSON, cloze items)
  replaced only with force and only when ``own`` recognises it as this package's earlier output;
* ``interruptible``: SIGTERM and SIGHUP raise ``Terminated`` (a KeyboardInterrupt), so they take the
  same clean-up path as Ctrl-C and leave no staging folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from .safety import _error, kind

__all__ = [
    "MARKER",
    "Terminated",
    "check_output",
    "overlap",
    "refuse_special",
    "staging_dir",
    "publish",
    "clean_stale",
    "mark",
    "marked",
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
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise _error(f"output {output or path} is {kind(mode)}; refusing to replace it, even with --force")


def check_output(output, inputs: Iterable = (), *, force: bool = False, what: str = "input checkpoint"):
    """Refuse an output that is, contains or lies inside an input, that is a special file, or that exists
    (non-empty) without force. Returns the absolute output path."""
    from .checkpoints import WEIGHT_SUFFIXES

    out = Path(os.path.abspath(output))
    for p in _input_paths(inputs):
        rel = overlap(out, p)
        if rel is not None:
            raise _error(f"output {output} {rel} the {what} {p}; choose another output")
    clean_stale(out)  # a killed run's aside copy may be the output itself: put it back before checking
    refuse_special(out, output)
    if out.exists() and not force:
        if out.is_file() or out.is_symlink() or any(out.iterdir()):
            raise _error(f"output {output} exists and is not empty; pass force=True (--force) to replace it")
    if out.is_file() and out.suffix not in WEIGHT_SUFFIXES:
        raise _error(f"output {output} is an existing file, not a checkpoint; choose another output")
    return out


# ------------------------------------------------------------------------------------ staging and publishing

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _tag() -> str:
    return f"{os.getpid()}@{_HOST}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove what a killed run (kill -9, power loss) left beside ``out``: its staging folders, and a
    replaced output renamed aside (deleted when a new output is in place, else renamed back). Only
    leftovers of processes of this host that no longer run are touched; returns what was cleaned."""
    pat = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)@{re.escape(_HOST)}-")
    cleaned = []
    with contextlib.suppress(OSError):
        for p in out.parent.iterdir():
            m = pat.match(p.name)
            if m is None or _alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and not (out.exists() or out.is_symlink()):
                os.rename(p, out)  # killed between the two renames of publish: the old output comes back
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            cleaned.append(p)
    return cleaned


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder next to ``out`` (parents created) in which to build an output before
    renaming it into place. mkdtemp makes it 0700; it gets the usual mode (0777 & ~umask), as the
    published folder should. Leftovers of killed runs on the same output are cleaned first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tag()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    try:  # read it rather than set it: os.umask is process-wide and racy under threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def publish(src: Path, dst: Path, force: bool) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (allowed by check_output) is renamed aside first and
    deleted only after the new one is in place. A special file at ``dst`` is never replaced."""
    aside = None
    refuse_special(dst)
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()
        elif not force:
            raise _error(f"output {dst} appeared while writing; pass force=True to replace it")
        else:
            aside = dst.with_name(f".{dst.name}.old-{_tag()}-{uuid.uuid4().hex[:8]}")
            os.rename(dst, aside)
    try:
        os.rename(src, dst)
    except BaseException:
        if aside is not None:
            os.rename(aside, dst)
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()


# ---------------------------------------------------------------------------------------- ownership


def mark(folder: Path, kind_: str) -> None:
    """Write the marker that tells a later run this folder is extramerge's own ``kind_`` output."""
    (folder / MARKER).write_text(json.dumps({"tool": "extramerge", "kind": kind_}) + "\n")


def _own_json(path: Path, key: str, value: str) -> bool:
    """Whether ``path`` is a small regular file holding a JSON object with ``key`` = ``value``."""
    from .safety import load_json

    try:
        doc = load_json(path, limit=2**20) if os.stat(path).st_size <= 2**20 else None
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get(key) == value


def marked(folder: Path, kind_: str) -> bool:
    """Whether ``folder`` (not a link) carries this package's marker for ``kind_``."""
    return folder.is_dir() and not folder.is_symlink() and _own_json(folder / MARKER, "kind", kind_)


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
            raise _error(f"output {path} {rel} the input {p}; choose another output")
    clean_stale(out)
    refuse_special(out, path)
    if out.is_dir():
        raise _error(f"output {path} is a folder (a file name is expected)")
    if out.exists() or out.is_symlink():
        if not force:
            raise _error(f"output {path} exists; pass --force to replace it")
        if out.is_symlink() or not own(out):
            raise _error(f"output {path} exists and was not written by extramerge; refusing to replace it")
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
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------ signals


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised where the program is, to unwind through the clean-up code."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def interruptible():
    """Within this block SIGTERM and SIGHUP raise ``Terminated`` (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
