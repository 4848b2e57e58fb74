"""The ``.metadata`` file of a torch.distributed.checkpoint (DCP) folder, read without trusting it.

torch writes ``.metadata`` with plain ``pickle.dump`` of its ``Metadata`` dataclass and reads it back with
an unrestricted unpickler (``FileSystemReader.read_metadata``), which calls whatever a crafted file names
(``os.system`` included); torch's weights-only unpickler cannot read it (it refuses the protocol-4
framing DCP writes). So ``read_index`` unpickles with a ``pickle.Unpickler`` whose ``find_class``
resolves only the globals DCP metadata is made of (its dataclasses, ``torch.Size``, dtypes, layouts,
paths) and raises CheckpointError for any other, naming the file and the global, before anything is
called. Then every field is checked:

* the object is a ``Metadata`` of ``{fqn: TensorStorageMetadata | BytesStorageMetadata}``, fqns strings;
* a tensor has a dtype, a size of non-negative integers and chunks whose offsets and sizes lie inside it,
  overlap nowhere and cover it exactly (their volumes add up to its element count);
* every chunk and byte entry has a storage entry naming a regular file inside the folder, with
  ``offset + length`` inside that file, and no transforms (compressed or extension storage is refused).

The result is a plain ``DcpIndex``; nothing of the pickled objects is kept.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import pickles, safety
from ..dtypes import dtype_code
from ..errors import CheckpointError
from . import cover

__all__ = ["METADATA", "METADATA_LIMIT", "Blob", "Chunk", "TensorEntry", "DcpIndex", "read_index"]

METADATA = ".metadata"
METADATA_LIMIT = pickles.PICKLE_LIMIT  # bytes of a .metadata file unpickled at most
_MDM = "torch.distributed.checkpoint.metadata"
_DATACLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                "TensorProperties", "MetadataIndex", "StorageMeta")  # fmt: skip
# The only objects whose state a .metadata pickle may set (BUILD): the dataclass instances it creates.
_BUILT = {(_MDM, n) for n in _DATACLASSES} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


@dataclass(frozen=True)
class Blob:
    """Bytes [offset, offset + length) of the file ``file`` (a name relative to the checkpoint folder)."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: the box [offsets, offsets + sizes) and where its bytes lie."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    blob: Blob

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: object  # torch.dtype
    chunks: tuple[Chunk, ...]  # in storage order; zero-volume chunks left out


@dataclass(frozen=True)
class DcpIndex:
    """What a DCP folder holds: tensors, byte entries (pickled objects, BytesIO), and the nesting path of
    each fqn (``planner_data``; what DCP uses to rebuild nested state dicts)."""

    tensors: dict[str, TensorEntry]
    objects: dict[str, Blob]
    planner_data: dict[str, tuple]
    files: tuple[str, ...]  # every storage file named, sorted
    version: str | None


def _allowed() -> dict[tuple[str, str], object]:
    import torch
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
    from torch.serialization import _get_layout

    allowed: dict[tuple[str, str], object] = {(_MDM, n): getattr(md, n) for n in _DATACLASSES}
    allowed[(_MDM, "_MEM_FORMAT_ENCODING")] = _MEM_FORMAT_ENCODING
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch.serialization", "_get_layout")] = _get_layout
    allowed[("torch", "Size")] = torch.Size
    allowed[("collections", "OrderedDict")] = OrderedDict
    for mod in ("pathlib", "pathlib._local"):  # storage_meta.checkpoint_id: kept as text, never used
        for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
            allowed[(mod, cls)] = _path_text
    return allowed


def _path_text(*parts) -> str:
    return str(pathlib.PurePosixPath(*(str(p) for p in parts)))


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only DCP metadata's own globals; anything else is refused before it can be called."""

    def __init__(self, f, where: Path, allowed: Mapping):
        super().__init__(f)
        self.where = where
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        import torch

        found = self.allowed.get((module, name))
        if found is not None:
            return found
        value = vars(torch).get(name) if module == "torch" else None  # no attribute hooks run
        if isinstance(value, torch.dtype | torch.layout):
            return value
        raise CheckpointError(
            f"{self.where}: refusing to unpickle the global {safety.shown(f'{module}.{name}', 120)}: DCP "
            "metadata holds only torch's checkpoint dataclasses (a crafted or foreign file?)"
        )

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.where}: refusing to unpickle a persistent id (not DCP metadata)")


def _unpickle(path: Path, root: Path):
    """The object pickled in ``path``, once ``pickles.scan`` has bounded its memory and refused BUILD on
    anything but the dataclass instances it creates (a class, a function, an enum member, ...)."""
    fd = safety.open_regular(path, root=root)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > METADATA_LIMIT:
            raise CheckpointError(f"{path}: larger than {METADATA_LIMIT} bytes; refusing to unpickle it")
        data = f.read(size + 1)
    pickles.scan(data, path, build=_BUILT, corrupt="corrupt DCP metadata")
    try:
        return _SafeUnpickler(io.BytesIO(data), path, _allowed()).load()
    except CheckpointError:
        raise
    except Exception as e:  # any failure of a corrupt pickle (RecursionError, MemoryError included)
        what = safety.shown(str(e).splitlines()[0] if str(e) else "", 120)[1:-1]
        raise CheckpointError(f"{path}: corrupt DCP metadata ({type(e).__name__}: {what})") from None


def _ints(x, n: int | None = None) -> tuple[int, ...] | None:
    """``x`` as a tuple of non-negative ints (a tuple/torch.Size/list of ints), else None."""
    if not isinstance(x, tuple | list) or (n is not None and len(x) != n):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x):
        return None
    return tuple(x)


def _storage(path: Path, raw) -> dict[tuple, Blob]:
    """{(fqn, offsets or None): Blob} from ``storage_data``, every field checked (not yet the files)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt DCP metadata (storage_data is not a dict)")
    out: dict[tuple, Blob] = {}
    for key, info in raw.items():
        if type(key) is not MetadataIndex or not isinstance(getattr(key, "fqn", None), str):
            raise CheckpointError(f"{path}: corrupt DCP metadata (a storage_data key is not a MetadataIndex)")
        offset = getattr(key, "offset", None)
        where = f"{path}: entry {safety.shown(key.fqn)}"
        if offset is not None and _ints(offset) is None:
            raise CheckpointError(f"{where}: corrupt storage key offset")
        if type(info) is not _StorageInfo:
            raise CheckpointError(f"{where}: corrupt DCP metadata (storage info is not a _StorageInfo)")
        rel, off, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if getattr(info, "transform_descriptors", None):
            what = _names(info.transform_descriptors)
            raise CheckpointError(
                f"{where} is stored with transforms {what} (compressed or extension DCP storage), which "
                "extramerge does not read; re-save without storage extensions"
            )
        if not isinstance(rel, str) or _ints((off, length)) is None:
            raise CheckpointError(f"{where}: corrupt storage info (relative_path, offset, length)")
        k = (key.fqn, None if offset is None else tuple(offset))
        if k in out:
            raise CheckpointError(f"{where}: stored twice at the same offset")
        out[k] = Blob(rel, off, length)
    return out


def _chunks(path: Path, fqn: str, shape: tuple, raw_chunks, storage: Mapping) -> tuple[Chunk, ...]:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    where = f"{path}: tensor {safety.shown(fqn)}"
    if not isinstance(raw_chunks, list):
        raise CheckpointError(f"{where}: corrupt DCP metadata (chunks is not a list)")
    chunks: list[Chunk] = []
    for c in raw_chunks:
        if type(c) is not ChunkStorageMetadata:
            raise CheckpointError(f"{where}: corrupt DCP metadata (a chunk is not a ChunkStorageMetadata)")
        offs, sizes = (
            _ints(getattr(c, "offsets", None), len(shape)),
            _ints(getattr(c, "sizes", None), len(shape)),
        )
        if offs is None or sizes is None:
            raise CheckpointError(
                f"{where}: a chunk's offsets/sizes are not {len(shape)} non-negative integers"
            )
        if any(o + s > d for o, s, d in zip(offs, sizes, shape, strict=True)):
            raise CheckpointError(
                f"{where}: chunk at offsets {list(offs)} sizes {list(sizes)} lies outside shape {list(shape)}"
            )
        if math.prod(sizes) == 0:
            continue  # an empty shard (uneven FSDP split): holds nothing
        blob = storage.get((fqn, offs))
        if blob is None:
            raise CheckpointError(f"{where}: no storage entry for its chunk at offsets {list(offs)}")
        chunks.append(Chunk(offs, sizes, blob))
    _check_cover(where, shape, chunks)
    return tuple(chunks)


def _check_cover(where: str, shape: tuple, chunks: list[Chunk]) -> None:
    """Chunks (inside the tensor) must tile it exactly: no overlap, no gap (``cover``, O(n log n))."""
    total = sum(c.numel for c in chunks)
    if total != math.prod(shape):
        raise CheckpointError(
            f"{where}: its chunks hold {total} elements but the tensor has {math.prod(shape)} (missing or "
            "overlapping chunks)"
        )
    if not shape:
        if len(chunks) != 1:
            raise CheckpointError(f"{where}: a scalar stored in {len(chunks)} chunks")
        return
    boxes = [(c.offsets, tuple(o + s for o, s in zip(c.offsets, c.sizes, strict=True))) for c in chunks]
    try:
        point = cover.uncovered(shape, boxes)
    except ValueError:
        raise CheckpointError(f"{where}: its {len(chunks)} chunks are too irregular to check") from None
    if point is None:
        return
    pair = cover.overlapping(point, boxes)[:2]
    if pair:
        a, b = (list(chunks[k].offsets) for k in pair)
        raise CheckpointError(f"{where}: chunks at offsets {a} and {b} overlap")
    raise CheckpointError(f"{where}: its chunks overlap or leave a gap at offsets {list(point)}")


def _check_files(path: Path, folder: Path, root: Path, blobs) -> tuple[str, ...]:
    """Every storage file: a member of the folder, a regular file, holding each blob's bytes."""
    sizes: dict[str, int] = {}
    for name, blob in blobs:
        if blob.file not in sizes:
            f = safety.member(folder, blob.file, METADATA)
            sizes[blob.file] = safety.regular(f, root=root).st_size
        if blob.offset + blob.length > sizes[blob.file]:
            raise CheckpointError(
                f"{folder / blob.file}: truncated: entry {safety.shown(name)} needs bytes up to "
                f"{blob.offset + blob.length} but the file has {sizes[blob.file]}"
            )
    return tuple(sorted(sizes))


def _names(x) -> str:
    """What a list of transform names holds, quoted short; never str() of it (it may nest 10**5 deep)."""
    items = list(x[:4]) if isinstance(x, list | tuple) else [x]
    shown = (safety.shown(i, 30) if isinstance(i, str) else type(i).__name__ for i in items)
    return "[" + ", ".join(shown) + "]"


def _planner_data(path: Path, raw, fqns) -> dict[str, tuple]:
    """The nesting path of each fqn (``planner_data``: None, or {fqn: tuple of strings and ints}); an
    fqn it does not name nests as itself."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt DCP metadata (planner_data is a {type(raw).__name__})")
    for fqn, p in raw.items():
        if not (isinstance(fqn, str) and isinstance(p, tuple) and 0 < len(p) <= 64):
            raise CheckpointError(f"{path}: corrupt DCP metadata (planner_data of {safety.shown(fqn)})")
        if not all(type(x) in (str, int) for x in p):
            raise CheckpointError(f"{path}: corrupt DCP metadata (planner_data of {safety.shown(fqn)})")
    return {fqn: raw.get(fqn, (fqn,)) for fqn in fqns}


def _check_storage_meta(path: Path, raw) -> None:
    """``storage_meta``: None, or a StorageMeta of optional strings and a list of module names (kept by
    nobody; checked so that a crafted object cannot hide there)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    if raw is None:
        return
    fields = ("checkpoint_id", "save_id", "load_id")
    ok = type(raw) is StorageMeta and all(isinstance(getattr(raw, f, None), str | None) for f in fields)
    modules = getattr(raw, "modules", None)
    if not (ok and isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise CheckpointError(f"{path}: corrupt DCP metadata (storage_meta is not a StorageMeta of strings)")


def read_index(folder: Path, root: Path | None = None) -> DcpIndex:
    """The validated contents of ``folder/.metadata`` (see the module docstring)."""
    import torch
    from torch.distributed.checkpoint import metadata as md

    folder = Path(folder)
    root = folder if root is None else Path(root)
    path = folder / METADATA
    obj = _unpickle(path, root)
    if type(obj) is not md.Metadata:
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(obj).__name__})")
    sd = getattr(obj, "state_dict_metadata", None)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: corrupt DCP metadata (state_dict_metadata is not a dict)")
    storage = _storage(path, getattr(obj, "storage_data", None))
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, Blob] = {}
    for fqn, entry in sd.items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{path}: corrupt DCP metadata (a key is not a string)")
        where = f"{path}: entry {safety.shown(fqn)}"
        if type(entry) is md.BytesStorageMetadata:
            blob = storage.get((fqn, None))
            if blob is None:
                raise CheckpointError(f"{where}: no storage entry for its bytes")
            objects[fqn] = blob
            continue
        if type(entry) is not md.TensorStorageMetadata:
            raise CheckpointError(f"{where}: corrupt DCP metadata (unknown entry type)")
        props, size = getattr(entry, "properties", None), _ints(getattr(entry, "size", None))
        dtype = getattr(props, "dtype", None) if type(props) is md.TensorProperties else None
        if not isinstance(dtype, torch.dtype) or size is None:
            raise CheckpointError(f"{where}: corrupt DCP metadata (tensor dtype or size)")
        try:
            dtype_code(dtype)
        except ValueError:
            raise CheckpointError(f"{where}: unsupported dtype {dtype}") from None
        tensors[fqn] = TensorEntry(
            size, dtype, _chunks(path, fqn, size, getattr(entry, "chunks", None), storage)
        )
    blobs = [(n, c.blob) for n, t in tensors.items() for c in t.chunks] + list(objects.items())
    files = _check_files(path, folder, root, blobs)
    version = getattr(obj, "version", None)
    _check_storage_meta(path, getattr(obj, "storage_meta", None))
    return DcpIndex(
        tensors,
        objects,
        _planner_data(path, getattr(obj, "planner_data", None), sd),
        files,
        version if isinstance(version, str) else None,
    )
