"""``Checkpoint``: one opened checkpoint (a file, a folder of one or more weight files, or a DCP folder),
tensor metadata known up front and tensor data read on demand (pread, or zero-copy views of memory-mapped
files with page advice), and ``check_compatible`` for a list of them.

A checkpoint reads through its sources (a safetensors file, a PyTorch file, a DCP folder), each
answering the ``Source`` protocol; the two single-file readers get theirs from small adapters here."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from . import safety
from .dtypes import ST_METADATA, TensorInfo
from .errors import CheckpointError
from .layout import parse_step
from .safetensors import SafetensorsFile
from .torchfile import TorchFile

__all__ = ["Source", "Checkpoint", "check_compatible"]


class Source(Protocol):
    """What a checkpoint asks of a source beyond ``path``, ``infos``, ``metadata``, ``read``,
    ``read_range`` and ``view_range`` (see Checkpoint's methods of the same names)."""

    def copies(self, name: str) -> bool:
        """Whether ``read_range`` fills a caller's buffer (True) or returns views (False)."""

    def mappable(self, name: str) -> bool:
        """Whether ``view_range`` returns a view for any range of ``name``."""

    def file_span(self, name: str, start: int, stop: int):
        """(file, lo, hi): the mapped file holding elements [start, stop) and their byte range, the file
        having ``madvise_span(lo, hi, advice)`` and ``check_size()``; None where there is none."""

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        """madvise the pages of elements [start, stop): 'populate', 'drop' or 'flush'."""

    def flush_advice(self) -> None:
        """Apply any batched 'drop' advice."""

    def release(self) -> None:
        """Let go of memory maps (tensors already returned stay valid)."""


class _SafetensorsOps:
    """The Source protocol of a SafetensorsFile (its reads are its own)."""

    def __init__(self, f: SafetensorsFile):
        self.f = f

    def copies(self, name: str) -> bool:
        return True

    def mappable(self, name: str) -> bool:
        return self.f.mapping() is not None

    def file_span(self, name: str, start: int, stop: int):
        return None if self.f.mapping() is None else (self.f, *self.f.span(name, start, stop))

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        self.f.advise(name, start, stop, advice)

    def flush_advice(self) -> None:
        self.f.advise("", 0, 0, "flush")

    def release(self) -> None:
        self.f.release()


class _TorchOps:
    """The Source protocol of a TorchFile: views of torch's own memory map, no advice."""

    def __init__(self, f: TorchFile):
        self.f = f

    def copies(self, name: str) -> bool:
        return False

    def mappable(self, name: str) -> bool:
        return True

    def file_span(self, name: str, start: int, stop: int):
        return None

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        return None

    def flush_advice(self) -> None:
        return None

    def release(self) -> None:
        self.f.tensors = {}


def _ops(src) -> Source:
    if isinstance(src, SafetensorsFile):
        return _SafetensorsOps(src)
    if isinstance(src, TorchFile):
        return _TorchOps(src)
    return src


class Checkpoint:
    """One checkpoint (file or folder), opened lazily: tensor metadata now, tensor data on ``read``.

    Attributes: ``path`` (what was opened), ``name`` (for messages), ``format`` (see ``formats``), ``step``
    (from the name, or None), ``infos`` (name -> TensorInfo of the distinct tensors, in stored order),
    ``aliases`` (tied/shared tensor name -> canonical name in ``infos``), ``extras`` (non-tensor entries of
    a training checkpoint, kept for the writer), ``metadata`` (safetensors ``__metadata__``), ``files``
    (the weight files), ``config`` (config.json of an HF folder, else None), ``state_tensors`` (name ->
    TensorInfo of stored training-state tensors left out of ``infos``: a DCP checkpoint's optimizer state),
    ``sources`` (what it reads through, see ``Source``).
    """

    def __init__(self, path: Path, fmt: str, sources: list, *, name: str | None = None, step=None, root=None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path  # every file read lies inside it
        self.format = fmt
        self.name = name or (self.path.name + ("/" if self.path.is_dir() else ""))
        self.step = parse_step(self.path.name) if step is None else step
        self.files = [p for s in sources for p in getattr(s, "paths", [s.path])]
        self._sources = sources
        self._ops = {id(s): _ops(s) for s in sources}
        self.state_tensors: dict[str, TensorInfo] = {}
        self._dropping = None  # the shard with batched 'drop' advice pending
        self._where: dict = {}
        self.infos: dict[str, TensorInfo] = {}
        self.aliases: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for src in sources:
            for n, info in src.infos.items():
                if n == ST_METADATA or getattr(src, "aliases", {}).get(ST_METADATA) is not None:
                    raise CheckpointError(
                        f"{self.path}: a tensor named {ST_METADATA!r}, the key safetensors reserves for its "
                        "header's metadata (no safetensors reader could load a file holding it); rename it"
                    )
                if n in self._where:
                    what = safety.shown(n)
                    raise CheckpointError(f"{self.path}: tensor {what} is stored twice ({src.path.name})")
                self._where[n] = src
                self.infos[n] = info
            self.aliases.update(getattr(src, "aliases", {}))
            self.metadata.update(src.metadata)
            self.state_tensors.update(getattr(src, "state_tensors", {}))
        if "extramerge.aliases" in self.metadata:  # written by our safetensors writer for untied aliases
            with contextlib.suppress(CheckpointError):
                found = safety.parse_json(self.metadata["extramerge.aliases"], f"{self.path}: aliases")
                if isinstance(found, dict):
                    self.aliases.update({a: c for a, c in found.items() if isinstance(c, str)})
        self.aliases = {a: c for a, c in self.aliases.items() if c in self.infos and a not in self.infos}
        first = sources[0] if sources else None
        self.extras: dict = dict(getattr(first, "extras", {})) if isinstance(first, TorchFile) else {}
        self.config = None
        if self.path.is_dir() and (self.path / "config.json").is_file():
            try:
                self.config = safety.load_json(self.path / "config.json", root=self.root)
            except CheckpointError:
                self.config = None

    @property
    def sources(self) -> tuple:
        return tuple(self._sources)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def held_bytes(self, chunk: int, workers: int) -> int:
        """Memory its sources take to read every tensor in ranges of ``chunk`` elements on ``workers``
        threads, besides the caller's buffers (contiguous copies of strided torch tensors, DCP slabs)."""
        return sum(f(chunk, workers) for f in (getattr(s, "held_bytes", None) for s in self._sources) if f)

    def _source(self, name: str):
        name = self.aliases.get(name, name)
        try:
            return self._where[name], name
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor {safety.shown(name)}") from None

    def _op(self, name: str) -> tuple[Source, str]:
        src, name = self._source(name)
        return self._ops[id(src)], name

    def copies(self, name: str) -> bool:
        """Whether ranged reads of ``name`` copy into a caller's buffer (safetensors, DCP) or return views."""
        op, name = self._op(name)
        return op.copies(name)

    def mappable(self, name: str) -> bool:
        """Whether ``view_range`` gives a view for every range of ``name``."""
        op, name = self._op(name)
        return op.mappable(name)

    def view_range(self, name: str, start: int, stop: int, *, numpy: bool = False):
        """Elements [start, stop) of the flattened tensor as a zero-copy view of the memory-mapped file
        (None if the file cannot be mapped or, in a DCP checkpoint, the range crosses chunks; use
        ``read_range``), a torch tensor or, with ``numpy``, an
        array. Never modify it. Pair with ``advise(..., 'populate')`` before use and
        ``advise(..., 'drop')`` after, to keep RSS bounded."""
        src, name = self._source(name)
        return src.view_range(name, start, stop, numpy=numpy)

    def span(self, name: str, start: int, stop: int):
        """(file, lo, hi): the memory-mapped file holding elements [start, stop) and their byte range in
        it, for ``file.madvise_span(lo, hi, 'populate' | 'drop')``; None for files that are not mapped by
        us (torch files, unmappable files) and for DCP ranges that cross chunks."""
        op, name = self._op(name)
        return op.file_span(name, start, stop)

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        """Map ('populate') or unmap ('drop') the pages behind elements [start, stop) of files we map
        (torch-file tensors are mapped by torch and left alone)."""
        src = self._where.get(self.aliases.get(name, name))  # None once closed: nothing left to advise
        if src is None:
            return
        op = self._ops[id(src)]
        if advice == "drop" and self._dropping is not op:
            if self._dropping is not None:  # moved on to the next shard: at most one batch pending
                self._dropping.flush_advice()
            self._dropping = op
        op.advise(self.aliases.get(name, name), start, stop, advice)

    def flush_advice(self) -> None:
        """Unmap any pages whose 'drop' advice is still batched."""
        for op in self._ops.values():
            op.flush_advice()

    def read(self, name: str, *, numpy: bool = False):
        """The whole tensor on CPU, shaped: a torch tensor or, with ``numpy``, an array. Safetensors: read
        with pread into fresh memory; torch files: a view of the memory-mapped file. Do not modify it."""
        src, name = self._source(name)
        return src.read(name, numpy=numpy)

    def read_range(self, name: str, start: int, stop: int, out=None, *, numpy: bool = False):
        """Elements [start, stop) of the flattened tensor (a torch tensor or, with ``numpy``, an array).
        Safetensors: read into ``out`` (any contiguous array or CPU tensor with enough bytes, reused by the
        caller) or fresh memory; torch files: a view."""
        src, name = self._source(name)
        return src.read_range(name, start, stop, out, numpy=numpy)

    @property
    def torch_layout(self) -> dict:
        """How a torch-file checkpoint nests its state dict (for the writer): nest key, prefixes, extras."""
        src = self._sources[0] if self._sources else None
        if not isinstance(src, TorchFile):
            return {"nest": None, "prefixes": [], "top_keys": [], "inner_extras": {}, "dropped": []}
        return {
            "nest": src.nest,
            "prefixes": sorted(src.prefixes),
            "top_keys": src.top_keys,
            "inner_extras": src.inner_extras,
            "dropped": src.dropped,
        }

    def close(self) -> None:
        """Release the memory maps (tensors already returned stay valid: each keeps its map alive)."""
        for op in self._ops.values():
            op.release()
        self._sources = []
        self._ops = {}
        self._where = {}
        self._dropping = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, format={self.format!r}, step={self.step}, "
            f"tensors={len(self.infos)}, bytes={self.nbytes})"
        )


def check_compatible(ckpts: Sequence[Checkpoint]) -> dict[str, TensorInfo]:
    """Same tensor names, shapes and dtypes in every checkpoint; returns the newest one's infos.

    Raises CheckpointError naming the first offending tensor and the two checkpoints.
    """
    if not ckpts:
        raise CheckpointError("no checkpoints given")
    ref = ckpts[0]
    for other in ckpts[1:]:
        a, b = ref.infos, other.infos
        for name, info in a.items():
            o, shown = b.get(name), safety.shown(name)
            if o is None:
                raise CheckpointError(f"tensor {shown} is in {ref.name} but missing from {other.name}")
            if o.shape != info.shape:
                raise CheckpointError(
                    f"tensor {shown} has shape {info.shape} in {ref.name} but {o.shape} in {other.name}"
                )
            if o.dtype_str != info.dtype_str:
                raise CheckpointError(
                    f"tensor {shown} has dtype {info.dtype_name} in {ref.name} but "
                    f"{o.dtype_name} in {other.name}"
                )
        for name in b:
            if name not in a:
                what = safety.shown(name)
                raise CheckpointError(f"tensor {what} is in {other.name} but missing from {ref.name}")
    return dict(ckpts[-1].infos)
