"""Publishing outputs atomically, shared by rivervalley and extramerge (extramerge.io.outputs adds its output
policy on top: overlap with inputs, the merge's record rule).

* ``publishing(out, force=...)``: the one way an output is written: ``with publishing(out) as stage:``
  yields a fresh staging folder ``.NAME.tmp-PID@HOST-*`` beside ``out``; when the block ends the folder (or,
  with ``file=True``, the file ``stage / out.name``) is renamed into place; on any exception
  (KeyboardInterrupt and ``Terminated`` included) nothing is published, and the staging folder is removed
  with the parent folders it created (a failed run leaves nothing behind, not even the folders it made
  for its output);
* ``locked(out)``: holds an exclusive lock on ``out``'s parent folder, so that two runs publishing to the
  same output (an output file and its side record) publish one after the other, never interleaved;
* ``publish(src, dst, force, expect)``: rename into place; an existing ``dst`` is renamed aside to
  ``.NAME.old-PID@HOST-*`` first, compared with what was checked (``expect``: device and inode; put back
  if it differs) and deleted through a descriptor once the new one is in (``entries``);
* ``clean_stale(out)``: what a killed run (kill -9) left beside ``out`` is removed, or put back;
* ``write_file(path, write)``: one file through ``publishing`` (``write(tmp_path)``, then publish);
* ``interruptible()``: SIGTERM and SIGHUP raise ``Terminated`` (a KeyboardInterrupt), so they unwind
  through the same clean-up code as Ctrl-C;
* ``deferred()``: SIGINT, SIGTERM and SIGHUP wait until a block ends (a unit of outputs saved whole);
  neither touches a signal the process inherited as ignored (``nohup``, a script's background job);
* ``refusal(path, force, ours)``: the one rule for what an output may replace: an absent path or an
  empty folder always; anything else only with ``force`` and only when ``ours`` recognises it as the same
  command's earlier output; never a link, FIFO, device or socket. ``claim_folder`` / ``claim_file`` apply
  it to rivervalley's folders and files, extramerge's policies (``extramerge.io.outputs``, study) too;
* ``mark(folder, doc)`` / ``marked(folder, key, value)``: the marker file (``.rivervalley-output``, or
  extramerge's ``.extramerge-output``) that tells a later run a folder is an earlier output, written
  atomically and read by ``own_json`` alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
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
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

from .entries import identity, own_json, remove_checked, rename_noreplace

__all__ = [
    "publishing",
    "locked",
    "publish",
    "clean_stale",
    "write_file",
    "Terminated",
    "interruptible",
    "deferred",
    "MARKER",
    "refusal",
    "claim_folder",
    "claim_file",
    "mark",
    "marked",
    "own_json",
    "special_mode",
    "too_long",
    "NAME_MAX",
]

MARKER = ".rivervalley-output"  # JSON {"tool": "rivervalley", "command": ...} in folders its commands write

NAME_MAX = 255  # bytes of one file name (Linux, macOS); a longer output name is refused before any work


def _host_tag(host: str) -> str:
    """The host as staging names carry it: its letters and digits (at most 24) and a hash of the whole
    name, so that hosts differing only in other characters or beyond 24 (``node-1``, ``node1``, long pod
    names) never share a tag, and one host's clean-up never takes another's staging folder for its own."""
    return f"{re.sub(r'[^A-Za-z0-9]', '', host)[:24]}_{hashlib.sha256(host.encode()).hexdigest()[:8]}"


HOST = _host_tag(socket.gethostname())
# Staging names written before the hash was added: recognised by clean_stale (hosts that differ only in
# other characters, or beyond 32, share this tag: such leftovers are cleaned as before, with that risk).
_LEGACY_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]
_NAME_KEPT = NAME_MAX - 64  # bytes of an output name kept whole in its staging names (PID, host, suffix)


def _tag() -> str:
    return f"{os.getpid()}@{HOST}"


def _short(name: str) -> str:
    """``name`` as staging names beside it carry it: whole, or where that would make them longer than
    NAME_MAX, its first 160 bytes and a hash of the whole name."""
    raw = name.encode(errors="surrogateescape")
    if len(raw) <= _NAME_KEPT:
        return name
    head = raw[:160].decode(errors="ignore")
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:8]}"


def too_long(path) -> str | None:
    """The first component of ``path`` longer than NAME_MAX bytes (which no file system here can create:
    'File name too long' only once the work is done), else None."""
    for part in Path(path).parts:
        if len(part.encode(errors="surrogateescape")) > NAME_MAX:
            return part
    return None


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
    hosts = "|".join(map(re.escape, (HOST, _LEGACY_HOST)))
    pat = re.compile(rf"\.{re.escape(_short(out.name))}\.(tmp|old)-(\d+)@(?:{hosts})-")
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


def _remove_created(folders: list[Path]) -> None:
    """Remove the folders a run created for its output (deepest first) that are empty now: a folder that
    holds something (the output, someone else's file) stays, and so do its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # never made (mkdir failed deeper up), or removed by someone else
        except OSError:
            break


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


_UNCHECKED = object()


def publish(src: Path, dst: Path, force: bool, expect=_UNCHECKED) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (allowed by the caller's checks) is renamed aside
    first and deleted only after the new one is in place. Without ``force`` an existing non-empty ``dst``
    raises FileExistsError.

    ``expect``: the ``entries.identity`` of ``dst`` the caller checked (None: checked absent). What is
    renamed aside must be that very entry, compared after the rename: anything else (swapped in since
    the check by someone who can write the folder) is put back and FileExistsError raised, nothing
    replaced; the old output is deleted through a descriptor compared again (``entries.remove_checked``).
    Without ``expect``, the entry found when this call starts is the one expected."""
    expect = identity(dst) if expect is _UNCHECKED else expect
    aside = None
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()
        elif not force or expect is None:
            raise FileExistsError(f"output {dst} appeared while writing; pass force=True to replace it")
        else:
            aside = dst.with_name(f".{_short(dst.name)}.old-{_tag()}-{uuid.uuid4().hex[:8]}")
            os.rename(dst, aside)
            if identity(aside) != expect:
                _put_back(aside, dst)
    try:
        rename_noreplace(src, dst)
    except BaseException as e:
        if aside is not None:
            os.rename(aside, dst)
        if isinstance(e, FileExistsError):
            raise FileExistsError(f"output {dst} appeared while writing; run again") from None
        raise
    if aside is not None:
        remove_checked(aside, expect)


def _put_back(aside: Path, dst: Path) -> None:
    """``dst`` was swapped since it was checked: put what was renamed aside back and refuse."""
    where = ""
    try:
        rename_noreplace(aside, dst)
    except OSError:
        where = f" (it is at {aside})"
    raise FileExistsError(
        f"output {dst} changed while it was being replaced (not the one checked{where}); nothing "
        "replaced, run again"
    )


@contextlib.contextmanager
def publishing(
    out,
    *,
    force: bool = False,
    file: bool = False,
    commit: Callable[[Path, Path, bool], None] | None = publish,
) -> Iterator[Path]:
    """Build the output ``out`` in a fresh staging folder beside it (parents created; what a killed run
    left beside ``out`` is cleaned first): yields that folder.

    When the block ends normally the staging folder, or with ``file`` the file ``stage / out.name`` in it,
    is renamed to ``out`` by ``commit(src, out, force)`` (``publish``: an existing ``out`` is replaced
    only with ``force``, renamed aside first). ``commit=None``: the block publishes the staged files itself
    (several files, under a lock), and the end of the block only cleans up. On any
    exception, KeyboardInterrupt and ``Terminated`` included, nothing more is published; in every case the
    staging folder is then removed, with each parent folder it created that is left empty."""
    out = Path(out)
    if too_long(out) is not None:  # before any folder is made
        raise OSError(errno.ENAMETOOLONG, f"file name longer than {NAME_MAX} bytes", too_long(out))
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_short(out.name)}.tmp-{_tag()}-", dir=out.parent))
        made = identity(tmp)  # what the clean-up may delete: this folder, whatever is at its name later
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets the usual mode
        yield tmp
        if commit is not None:
            commit(tmp / out.name if file else tmp, out, force)
    finally:
        if tmp is not None:
            remove_checked(tmp, made)  # gone already when it was published
        _remove_created(created)


def write_file(path, write: Callable[[Path], None]) -> Path:
    """Write the file ``path`` through ``publishing``: ``write(tmp)`` creates the file ``tmp`` (same name)
    in the staging folder, which then replaces ``path``. A special file (FIFO, device, socket) or folder
    at ``path`` is refused (ValueError); on any exception nothing is published and nothing is left."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise ValueError(f"{path}: exists and is not a regular file; refusing to replace it")
    with publishing(path, force=True, file=True) as tmp:
        write(tmp / path.name)
    return path


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised where the program is, to unwind through the clean-up code."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


def _handled(signals, handler) -> dict:
    """Install ``handler`` for each of ``signals`` this process does not ignore; returns the handlers
    replaced. A signal inherited as ignored (SIGINT in a background job of a script, SIGHUP under nohup)
    stays ignored: a background job that ignores Ctrl-C keeps ignoring it."""
    return {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}


@contextlib.contextmanager
def interruptible():
    """Within this block SIGTERM and SIGHUP raise ``Terminated`` (main thread only; restored after). One
    this process ignores stays ignored (``nohup``: SIGHUP)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = _handled((signal.SIGTERM, signal.SIGHUP), _raise)
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
    ``Terminated``): the caller's clean-up still runs. A signal this process ignores stays ignored (not
    held, so neither delivered nor raised). Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        held.append(signum)

    old = _handled((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), hold)
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


def refusal(
    path,
    force: bool,
    ours: Callable[[Path], bool] | None,
    *,
    ignore: Collection[str] = (),
    file: bool = False,
) -> str | None:
    """The one rule for what writing the output ``path`` may replace. None when it may be written: it is
    absent, or an empty folder (entries named in ``ignore`` aside), or, with ``force``, an output that
    ``ours(path)`` recognises as the same command's earlier output (a link never is). Otherwise why not:
    "special" (a FIFO, device or socket: never), "folder" (``file``: the output is a file, and a file never
    replaces a folder, even an empty one or a link to one), "force" (something is there: only with force)
    or "foreign" (not ours: not even with force). ``ours=None``: whose output it is is decided later (the
    merge's record, once its layout is known); only "special", "folder" and "force" are answered."""
    path = Path(path)
    if special_mode(path) is not None:
        return "special"
    if file and path.is_dir():
        return "folder"
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_dir() and not path.is_symlink() and all(p.name in ignore for p in path.iterdir()):
        return None
    if not force:
        return "force"
    if ours is not None and (path.is_symlink() or not ours(path)):
        return "foreign"
    return None


def mark(folder, doc: Mapping[str, str], marker: str = MARKER) -> None:
    """Record in ``folder`` whose output it is: the JSON object ``doc`` (e.g. ``{"tool": "rivervalley",
    "command": "simulate"}``) in the file ``marker``, written atomically."""
    text = json.dumps(dict(doc)) + "\n"
    write_file(Path(folder) / marker, lambda p: p.write_text(text))


def marked(folder, key: str = "tool", value: str = "rivervalley", marker: str = MARKER) -> bool:
    """Whether ``folder`` (a folder, not a link) carries the ``marker`` file with ``key`` = ``value``."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and own_json(folder / marker, key, value)


def claim_folder(
    out, force: bool, command: str, *, ours: Callable[[Path], bool] = marked, owner: str = "rivervalley",
    marker: str = MARKER,
) -> Path:  # fmt: skip
    """Check that ``command`` may write its files into the folder ``out`` (ValueError otherwise): the rule
    of ``refusal`` for a folder, the ``marker`` file itself not counting as content; ``ours`` recognises
    an earlier output of ``owner`` (by default the marker a rivervalley command writes; extramerge passes
    its own)."""
    out = Path(out)
    if special_mode(out) is None and (out.is_symlink() or (out.exists() and not out.is_dir())):
        raise ValueError(f"output {out} exists and is not a folder; choose another output")
    why = refusal(out, force, ours, ignore=(marker,))
    if why == "special":
        raise ValueError(f"{out}: exists and is not a regular file or folder; refusing to replace it")
    if why == "force":
        raise ValueError(f"output {out} exists and is not empty; pass --force to replace {command}'s files")
    if why == "foreign":
        raise ValueError(
            f"output {out} was not written by {owner} (no {marker} marker); refusing to write into "
            "it, even with --force"
        )
    return out


def claim_file(path, force: bool, ours: Callable[[Path], bool], tool: str = "rivervalley") -> Path:
    """Check that a command may write the file ``path``: the rule of ``refusal`` for a file (new, or with
    ``force`` one that ``ours(path)`` recognises by its content as this command's earlier output); never a
    folder or special file. ``tool`` names the package in the message."""
    path = Path(path)
    why = refusal(path, force, ours, file=True)
    if why == "folder":
        raise ValueError(f"output {path} is a folder (a file name is expected)")
    if why == "special":
        raise ValueError(f"{path}: exists and is not a regular file or folder; refusing to replace it")
    if why == "force":
        raise ValueError(f"output {path} exists; pass --force to replace it")
    if why == "foreign":
        raise ValueError(f"output {path} exists and was not written by {tool}; refusing to replace it")
    return path
