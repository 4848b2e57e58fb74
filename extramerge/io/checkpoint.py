"""``Checkpoint``: one opened checkpoint (a file or folder of one or more weight files), tensor metadata
known up front and tensor data read on demand (pread, or zero-copy views of memory-mapped files with
page advice), and ``check_compatible`` for a list of them."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from . import safety
from .dtypes import TensorInfo
from .errors import CheckpointError
from .layout import parse_step
from .safetensors import SafetensorsFile
from .torchfile import TorchFile

__all__ = ["Checkpoint", "check_compatible"]


class Checkpoint:
    """One checkpoint (file or folder), opened lazily: tensor metadata now, tensor data on ``read``.

    Attributes: ``path`` (what was opened), ``name`` (for messages), ``format`` (see FORMATS), ``step``
    (from the name, or None), ``infos`` (name -> TensorInfo of the distinct tensors, in stored order),
    ``aliases`` (tied/shared tensor name -> canonical name in ``infos``), ``extras`` (non-tensor entries of
    a training checkpoint, kept for the writer), ``metadata`` (safetensors ``__metadata__``), ``files``
    (the weight files), ``config`` (config.json of an HF folder, else None).
    """

    def __init__(self, path: Path, fmt: str, sources: list, *, name: str | None = None, step=None, root=None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path  # every file read lies inside it
        self.format = fmt
        self.name = name or (self.path.name + ("/" if self.path.is_dir() else ""))
        self.step = parse_step(self.path.name) if step is None else step
        self.files = [s.path for s in sources]
        self._sources = sources
        self._dropping = None  # the shard with batched 'drop' advice pending
        self._where: dict = {}
        self.infos: dict[str, TensorInfo] = {}
        self.aliases: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for src in sources:
            for n, info in src.infos.items():
                if n in self._where:
                    what = safety.shown(n)
                    raise CheckpointError(f"{self.path}: tensor {what} is stored twice ({src.path.name})")
                self._where[n] = src
                self.infos[n] = info
            self.aliases.update(getattr(src, "aliases", {}))
            self.metadata.update(src.metadata)
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
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def _source(self, name: str):
        name = self.aliases.get(name, name)
        try:
            return self._where[name], name
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor {safety.shown(name)}") from None

    def copies(self, name: str) -> bool:
        """Whether ranged reads of ``name`` copy into a caller's buffer (safetensors) or return views."""
        return isinstance(self._source(name)[0], SafetensorsFile)

    def mappable(self, name: str) -> bool:
        src, _ = self._source(name)
        return not isinstance(src, SafetensorsFile) or src.mapping() is not None

    def view_range(self, name: str, start: int, stop: int, *, numpy: bool = False):
        """Elements [start, stop) of the flattened tensor as a zero-copy view of the memory-mapped file
        (None if the file cannot be mapped; use ``read_range``), a torch tensor or, with ``numpy``, an
        array. Never modify it. Pair with ``advise(..., 'populate')`` before use and
        ``advise(..., 'drop')`` after, to keep RSS bounded."""
        src, name = self._source(name)
        return src.view_range(name, start, stop, numpy=numpy)

    def span(self, name: str, start: int, stop: int):
        """(file, lo, hi): the memory-mapped safetensors file holding elements [start, stop) and their
        byte range in it, for ``file.madvise_span(lo, hi, 'populate' | 'drop')``; None for files that are
        not mapped by us (torch files, unmappable files)."""
        src, name = self._source(name)
        if not isinstance(src, SafetensorsFile) or src.mapping() is None:
            return None
        return (src, *src.span(name, start, stop))

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        """Map ('populate') or unmap ('drop') the pages behind elements [start, stop); safetensors only
        (torch-file tensors are mapped by torch and left alone)."""
        src = self._where.get(self.aliases.get(name, name))  # None once closed: nothing left to advise
        if isinstance(src, SafetensorsFile):
            if advice == "drop" and self._dropping is not src:
                if self._dropping is not None:  # moved on to the next shard: at most one batch pending
                    self._dropping.advise("", 0, 0, "flush")
                self._dropping = src
            src.advise(self.aliases.get(name, name), start, stop, advice)

    def flush_advice(self) -> None:
        """Unmap any pages whose 'drop' advice is still batched."""
        for src in self._sources:
            if isinstance(src, SafetensorsFile):
                src.advise("", 0, 0, "flush")

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
        for src in self._sources:
            if isinstance(src, TorchFile):
                src.tensors = {}
            else:
                src._mm = None
        self._sources = []
        self._where = {}

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
