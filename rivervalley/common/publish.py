"""Publishing outputs atomically, shared by rivervalley and extramerge (extramerge.io.outputs adds its output
policy on top: overlap with inputs, --force, ownership markers).

* ``staging_dir(out)``: a fresh folder ``.NAME.tmp-PID@HOST-*`` beside ``out`` to build it in;
  ``discard(tmp)`` removes it, and the parent folders ``staging_dir`` created if they are still empty
  (a failed run leaves nothing behind, not even the folders it made for its output);
* ``locked(out)``: holds an exclusive lock on ``out``'s parent folder, so that two runs publishing to the
  same output (an output file and its side record) publish one after the other, never interleaved;
* ``publish(src, dst, force)``: rename into place; an existing ``dst`` is renamed aside to
  ``.NAME.old-PID@HOST-*`` first and deleted once the new one is in;
* ``clean_stale(out)``: what a killed run (kill -9) left beside ``out`` is removed, or put back;
* ``write_file(path, write)``: one file through a staging folder (``write(tmp_path)``, then publish);
* ``interruptible()``: SIGTERM and SIGHUP raise ``Terminated`` (a KeyboardInterrupt), so they unwind
  through the same clean-up code as Ctrl-C;
* ``deferred()``: SIGINT, SIGTERM and SIGHUP wait until a block ends (a unit of outputs saved whole);
* ``claim_folder(out, force, command)`` / ``mark_folder(out, command)``: what the rivervalley commands may
  replace: a non-empty output folder only with ``force`` and only when it carries the marker an earlier
  rivervalley command wrote there; ``claim_file(path, force, ours)`` the same for a single file,
  recognised by its content.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "staging_dir",
    "discard",
    "locked",
    "publish",
    "clean_stale",
    "write_file",
    "Terminated",
    "interruptible",
    "deferred",
    "MARKER",
    "claim_folder",
    "mark_folder",
    "claim_file",
    "special_mode",
]

MARKER = ".rivervalley-output"  # JSON {"tool": "rivervalley", "command": ...} in folders its commands write

HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _tag() -> str:
    return f"{os.getpid()}@{HOST}"


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
    pat = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)@{re.escape(HOST)}-")
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
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tag()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    _CREATED[tmp] = created  # deepest first
    return tmp


_CREATED: dict[Path, list[Path]] = {}


def discard(tmp: Path) -> None:
    """Remove the staging folder ``tmp`` (if still there) and then each parent folder ``staging_dir``
    created for it that is now empty, deepest first. Safe after a successful publish too: a parent that
    holds the output is not empty and stays."""
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in _CREATED.pop(tmp, []):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (the output, or someone else's file), or gone: its parents stay too


@contextlib.contextmanager
def locked(out: Path):
    """An exclusive advisory lock (flock) on ``out``'s parent folder for the block: runs that publish to
    the same place take turns. Nothing is created for it; where folders cannot be locked, no lock."""
    try:
        fd = os.open(out.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
    """Rename ``src`` to ``dst``; an existing ``dst`` (allowed by the caller's checks) is renamed aside
    first and deleted only after the new one is in place. Without ``force`` an existing non-empty ``dst``
    raises FileExistsError."""
    aside = None
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()
        elif not force:
            raise FileExistsError(f"output {dst} appeared while writing; pass force=True to replace it")
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


def write_file(path, write: Callable[[Path], None]) -> Path:
    """Write the file ``path`` through a staging folder beside it: ``write(tmp)`` creates the file ``tmp``
    (same name), which then replaces ``path``. A special file (FIFO, device, socket) or folder at ``path``
    is refused (ValueError); on any exception nothing is published and the staging folder is removed."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise ValueError(f"{path}: exists and is not a regular file; refusing to replace it")
    tmp = staging_dir(path)
    try:
        write(tmp / path.name)
        publish(tmp / path.name, path, force=True)
    finally:
        discard(tmp)
    return path


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


@contextlib.contextmanager
def deferred():
    """Within this block SIGINT, SIGTERM and SIGHUP are held, so that outputs which belong together (a
    checkpoint and its resume state) are saved whole; the first one is delivered when the block ends, to
    the handlers in force outside it. A second one during the block raises at once (KeyboardInterrupt or
    ``Terminated``): the caller's clean-up still runs. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        held.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if held:
        signal.raise_signal(held[0])


# ------------------------------------------------------------------------------------------- ownership


def special_mode(path: Path) -> int | None:
    """The mode of ``path`` when it is a special file (FIFO, device, socket) that no output may replace,
    else None (absent, or a regular file, folder or link). One definition for both packages."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode) else mode


def _refuse_special(path: Path) -> None:
    if special_mode(path) is not None:
        raise ValueError(f"{path}: exists and is not a regular file or folder; refusing to replace it")


def _marked(folder: Path) -> bool:
    try:
        with open(folder / MARKER, "rb") as f:
            doc = json.loads(f.read(4096))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("tool") == "rivervalley"


def claim_folder(
    out, force: bool, command: str, *, marked: Callable[[Path], bool] = _marked, owner: str = "rivervalley",
    marker: str = MARKER,
) -> Path:  # fmt: skip
    """Check that ``command`` may write its files into the folder ``out`` (ValueError otherwise): a new or
    empty folder, or with ``force`` a folder that ``marked`` recognises as an earlier output of ``owner``
    (by default the ``marker`` file a rivervalley command writes; extramerge passes its own)."""
    out = Path(out)
    _refuse_special(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"output {out} exists and is not a folder; choose another output")
    if out.is_dir() and any(p.name != marker for p in out.iterdir()):
        if not force:
            raise ValueError(
                f"output {out} exists and is not empty; pass --force to replace {command}'s files"
            )
        if not marked(out):
            raise ValueError(
                f"output {out} was not written by {owner} (no {marker} marker); refusing to write into "
                "it, even with --force"
            )
    return out


def mark_folder(out, command: str) -> None:
    """Record in ``out`` that rivervalley ``command`` wrote it (what a later ``--force`` may replace)."""
    text = json.dumps({"tool": "rivervalley", "command": command}) + "\n"
    write_file(Path(out) / MARKER, lambda p: p.write_text(text))


def claim_file(path, force: bool, ours: Callable[[Path], bool], tool: str = "rivervalley") -> Path:
    """Check that a command may write the file ``path``: new, or with ``force`` one that ``ours(path)``
    recognises (by its content) as this command's earlier output; never a folder or special file.
    ``tool`` names the package in the message."""
    path = Path(path)
    _refuse_special(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder (a file name is expected)")
    if path.exists() or path.is_symlink():
        if not force:
            raise ValueError(f"output {path} exists; pass --force to replace it")
        if path.is_symlink() or not ours(path):
            raise ValueError(f"output {path} exists and was not written by {tool}; refusing to replace it")
    return path
