"""Input policy: what extramerge agrees to open, for checkpoints and every file that comes with them.

Checkpoints, their index and side files, data files and run folders are untrusted input. The rules,
each enforced by one function here:

* a file named inside a checkpoint (an index's shard name, a config or tokenizer file) is a plain relative
  name whose real path stays inside the checkpoint's folder (``member``, ``inside``);
* only regular files are read: a FIFO, device or socket is refused before it is opened for reading, so
  it cannot block or stream forever (``open_regular``, ``regular``);
* a check is bound to what is used: ``open_regular`` checks the descriptor it opened (regular file, and
  where the kernel says it lives: inside the root), and ``copy_regular`` copies through that descriptor,
  so swapping a file for a link between the check and the use (a folder others can write) gains nothing;
* JSON is parsed with bounded size and depth and without non-finite numbers (``load_json``, ``parse_json``);
* messages quote untrusted text escaped and shortened (``shown``), never raw bytes of a file;
* one file or folder given twice (same device and inode) is refused (``distinct``);
* an input file with several hard links is read, with one warning per file: a hard link to a file outside
  the folder is a regular file inside it, which no path check can tell apart (``open_regular``).

Every violation raises ``CheckpointError`` (a ValueError): the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError

__all__ = [
    "shown",
    "kind",
    "member",
    "inside",
    "regular",
    "open_regular",
    "copy_regular",
    "read_text",
    "parse_json",
    "load_json",
    "jsonl",
    "folder_files",
    "distinct",
    "check_npz",
]

JSON_LIMIT = 100 * 2**20  # bytes of an index/config JSON file read at most
LINE_LIMIT = 16 * 2**20  # bytes of one JSONL line (a data document or a cloze item) read at most
NPZ_MEMBERS = 64  # arrays of an .npz read at most (a gram.npz has 9)
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}
_LINKED: set[tuple[int, int, str]] = set()  # (device, inode, path) of the files warned about (once each)
_LINKED_LOCK = threading.Lock()


def shown(text: object, limit: int = 80) -> str:
    """Untrusted text fit for a one-line message: non-printable characters escaped, at most ``limit``
    characters (then '...'), quoted."""
    s = text if isinstance(text, str) else repr(text)
    s = "".join(c if c.isprintable() and c != "'" else repr(c)[1:-1] for c in s[: limit + 1])
    return f"'{s[:limit]}...'" if len(s) > limit else f"'{s}'"


def kind(mode: int) -> str:
    """'a FIFO', 'a character device', ... for a non-regular file mode."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``'s real location (symbolic links resolved) lies inside ``root``'s. An entry that
    changes between the steps of resolving it (a link one moment, a file the next: EINVAL) raises
    CheckpointError naming it."""
    return Path(_real(path)).is_relative_to(_real(root))


def _real(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except OSError as e:
        raise CheckpointError(
            f"{path}: changed while it was being checked ({e.strerror or type(e).__name__}); refusing to "
            "read it"
        ) from None


def member(root: Path, name: object, what: str) -> Path:
    """``root / name`` for a file name read from inside a checkpoint (an index's shard, a side file).

    The name must be a non-empty string, relative, without '..' components, and its real path must stay
    inside ``root``; ``what`` names where the name came from (e.g. 'model.safetensors.index.json')."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{root}: {what} names a file that is not a valid file name ({shown(name)})")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{root}: {what} names {shown(name)}, which points outside the checkpoint folder"
        )
    full = root / p
    if not inside(full, root):
        raise CheckpointError(f"{root}: {what} names {shown(name)}, a link that leaves the checkpoint folder")
    return full


def regular(path: Path, *, root: Path | None = None) -> os.stat_result:
    """stat of ``path`` (links followed), refusing anything but a regular file, and with ``root`` a file
    whose real path leaves ``root``."""
    if root is not None and not inside(path, root):
        raise CheckpointError(f"{path}: a link that leaves the checkpoint folder {root}; refusing to read it")
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: is {kind(st.st_mode)}, not a regular file; refusing to read it")
    return st


def open_regular(path: Path, *, root: Path | None = None) -> int:
    """A read-only descriptor of ``path``, opened without blocking (a FIFO cannot stall the open) and
    checked to be a regular file (and inside ``root``) on the descriptor itself; a file with several hard
    links warns once (``_warn_linked``), from the same ``fstat``. The caller closes it."""
    if root is not None and not inside(path, root):
        raise CheckpointError(f"{path}: a link that leaves the checkpoint folder {root}; refusing to read it")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is {kind(st.st_mode)}, not a regular file; refusing to read it")
    if root is not None and not _opened_inside(fd, root):  # swapped for a link since the check above
        os.close(fd)
        raise CheckpointError(f"{path}: a link that leaves the checkpoint folder {root}; refusing to read it")
    if st.st_nlink > 1:
        _warn_linked(path, st)
    return fd


def _opened_inside(fd: int, root: Path) -> bool:
    """Whether the file open as ``fd`` lies inside ``root``'s real path, as the kernel names it
    (/proc/self/fd/N): what was opened, whatever the path pointed to a moment before. Where there is no
    /proc (not Linux), the path check made before the open stands."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return Path(real).is_relative_to(_real(root))


def copy_regular(path: Path, dst: Path, *, root: Path | None = None) -> int:
    """Copy the regular file ``path`` (inside ``root``) to the new file ``dst`` through the descriptor
    ``open_regular`` checked, never by path again. Returns the bytes copied."""
    with os.fdopen(open_regular(path, root=root), "rb") as f, open(dst, "xb") as g:
        shutil.copyfileobj(f, g, 2**20)
        return g.tell()


def _warn_linked(path: Path, st: os.stat_result) -> None:
    """Warn once per file (device, inode and path) that ``path`` has several hard links: a hard link to a
    file outside the folder cannot be told from a file of the folder, so its contents may be shared."""
    key = (st.st_dev, st.st_ino, os.fspath(path))
    with _LINKED_LOCK:
        if key in _LINKED:
            return
        _LINKED.add(key)
    warnings.warn(
        f"{path}: has {st.st_nlink} hard links: its contents may be shared with a file outside the folder",
        UserWarning,
        stacklevel=3,
    )


def _no_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    x = float(text)
    if x in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range ({text[:20]})")
    return x


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def parse_json(raw: bytes | str, where: str):
    """JSON value of ``raw``: UTF-8, no NaN/Infinity, no number overflowing to infinity, no duplicate keys,
    nesting bounded by the interpreter's recursion limit. ``where`` (a file, or file:line) prefixes the
    error, which never quotes the input's bytes."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        return json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # ours above, or an integer too long to convert
        raise CheckpointError(f"{where}: invalid JSON ({str(e).splitlines()[0][:80]})") from None


def load_json(path: Path, *, root: Path | None = None, limit: int = JSON_LIMIT):
    """``parse_json`` of a regular file (inside ``root``) of at most ``limit`` bytes."""
    fd = open_regular(path, root=root)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise CheckpointError(f"{path}: larger than {limit} bytes; refusing to parse it")
    return parse_json(raw, str(path))


def read_text(path: Path) -> str:
    """The UTF-8 text of a regular file (a FIFO or /dev/zero is refused, not read forever)."""
    with os.fdopen(open_regular(path), "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None


def jsonl(path: Path, *, limit: int | None = None):
    """Yield (line number, JSON value) for each non-blank line of a regular file, one line in memory at a
    time; a line longer than ``limit`` (default LINE_LIMIT) bytes, or any ``parse_json`` failure, raises
    naming file:line."""
    limit = LINE_LIMIT if limit is None else limit
    with os.fdopen(open_regular(path), "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(limit + 1), b""), 1):
            body = line.rstrip(b"\r\n")
            if len(body) > limit:
                raise CheckpointError(
                    f"{path}:{lineno}: line longer than {limit} bytes; refusing to parse it"
                )
            if body.strip():
                yield lineno, parse_json(body, f"{path}:{lineno}")


def folder_files(folder: Path, names=None) -> None:
    """Refuse entries of ``folder`` (all of them, or those ``names`` that exist) that are links leaving it
    or special files (a FIFO, device or socket), before a library such as transformers opens them."""
    entries = folder.iterdir() if names is None else (folder / n for n in names)
    for p in entries:
        if not (p.exists() or p.is_symlink()) or p.name.startswith("."):
            continue
        if not inside(p, folder):
            raise CheckpointError(f"{p}: a link that leaves the folder {folder}; refusing to read it")
        if p.exists() and not (p.is_file() or p.is_dir()):
            raise CheckpointError(
                f"{p}: is {kind(os.stat(p).st_mode)}, not a regular file; refusing to read it"
            )


def distinct(paths: Iterable[Path]) -> None:
    """Refuse two paths that are the same file or folder (equal device and inode), however spelled."""
    seen: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue  # a hub reference or a vanished path: reported by whoever opens it
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise CheckpointError(
                f"{p}: the same checkpoint as {seen[key]} (given twice); list each checkpoint once"
            )
        seen[key] = p


def check_npz(f, path: Path, what: str = "an .npz file") -> None:
    """Refuse an .npz whose arrays could take more memory than the file's size (a zip bomb): more than
    NPZ_MEMBERS members, a compressed member (``np.savez`` never compresses), or a member whose array
    header claims more bytes than it holds (numpy allocates what the header says before reading). Each
    stored array then takes at most its member's size, and all of them at most the file's. ``f`` is the
    open binary file the caller then loads (checked where it is read: rewound to its start after);
    ``path`` names it and ``what`` what it should be, in the message for one that is not a zip archive."""
    import zipfile

    from numpy.lib import format as npf

    try:
        with zipfile.ZipFile(f) as z:
            members = z.infolist()
            if len(members) > NPZ_MEMBERS:
                raise CheckpointError(f"{path}: {len(members)} arrays, over {NPZ_MEMBERS}; refusing it")
            for m in members:
                _check_npz_member(z, m, path, npf)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not {what} ({type(e).__name__})") from None
    f.seek(0)


def _check_npz_member(z, m, path: Path, npf) -> None:
    import math
    import zipfile

    what = f"{path}: array {shown(m.filename)}"
    if m.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{what} is compressed (np.savez never compresses); refusing to inflate it")
    with z.open(m) as f:
        version = npf.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise CheckpointError(f"{what}: .npy format version {version} is not read")
        read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        shape, _, dtype = read(f)
    if dtype.hasobject:
        return  # pickled objects: np.load(allow_pickle=False) refuses them without reading them
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > m.file_size:
        raise CheckpointError(
            f"{what}: its header claims {claimed} bytes but it holds {m.file_size}; refusing to read it"
        )
