"""Checkpoint formats as data: one ``Format`` per name (``REGISTRY``), saying how a checkpoint of it is named,
read and written, and what a merge writing it must plan for (the whole output collected in memory; output
written by several processes, as byte ranges of preallocated files or as whole files per rank). Readers,
writers and the merge engine read these attributes; no module branches on a format's name.

An output path ending in a file format's suffix selects that format (``by_suffix``); otherwise the
newest input's format is kept (``writer.default_format``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .dcp import write_output as write_dcp
from .errors import CheckpointError
from .layout import TORCH_SUFFIXES
from .safetensors import SafetensorsFile
from .shards import safetensors_files, write_safetensors, write_safetensors_index
from .torchfile import TorchFile, write_torch

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .dtypes import TensorInfo

__all__ = ["Format", "Target", "REGISTRY", "FORMATS", "get", "by_suffix"]


@dataclass(frozen=True)
class Target:
    """What a format's ``write`` needs besides the tensors: the file name of a one-file output
    (``writer.output_layout``), the newest input (``template``), tied ``aliases`` (alias → canonical name),
    the largest shard or ``.distcp`` file, safetensors ``metadata``, and how to flush."""

    fname: str
    template: Checkpoint | None
    aliases: Mapping[str, str]
    shard_size: int
    metadata: Mapping[str, str] | None
    fsync: bool
    direct_io: bool | None


# writer(format, staging folder, stream, infos, target): see Format.write
Writer = Callable[["Format", Path, object, "Mapping[str, TensorInfo]", Target], tuple[list[str], int, float]]


@dataclass(frozen=True)
class Format:
    """One checkpoint format: how it is named, read and written, and what a merge writing it plans for."""

    name: str
    # Weight-file name endings, the first naming a new file; an output path ending in a file format's
    # suffix is written in that format.
    suffixes: tuple[str, ...]
    folder: bool  # always a folder: an output named like a weight file is refused
    reader: type | None  # opens one weight file; None: a DCP folder, opened whole by io.dcp.open_dcp
    writer: Writer  # writes an output (see ``write``)
    collects: bool = False  # torch.save needs the whole output in memory
    ranked: bool = False  # several processes (torchrun, srun) can write it
    # ... each rank writing whole files (DCP), not byte ranges of files rank 0 preallocated (safetensors)
    whole_files_per_rank: bool = False
    # An HF folder: weights STEM<suffix>, or STEM-0000k-of-0000K<suffix> shards with the index
    # STEM<suffix>.index.json; config and tokenizer files are copied from the newest input.
    hf_stem: str | None = None
    # The index lists exactly each shard's tensors (checked on opening); a torch shard's tied names are
    # its reader's aliases, not tensors, so a .bin index is not checked against them.
    checks_index: bool = False
    run_root: bool = False  # a Megatron run root: a tracker file and the iteration folder holding the DCP
    # Pages read stay resident until the checkpoint is closed (torch.load(mmap=True)): a merge's projected
    # memory counts them.
    resident_reads: bool = False

    @property
    def weights_file(self) -> str | None:
        """An HF folder's one weights file (model.safetensors), None for other formats."""
        return None if self.hf_stem is None else self.hf_stem + self.suffixes[0]

    @property
    def index_file(self) -> str | None:
        """An HF folder's shard index (model.safetensors.index.json), None for other formats."""
        return None if self.hf_stem is None else f"{self.weights_file}.index.json"

    def write(
        self, tmp: Path, stream, infos: Mapping[str, TensorInfo], target: Target
    ) -> tuple[list[str], int, float]:
        """Write the tensors of ``infos`` (``stream.pieces(name)``: each one's flat pieces, in order) into the
        staging folder ``tmp``. Returns (files written, relative to ``tmp``; tensor bytes; seconds in
        fsync)."""
        return self.writer(self, tmp, stream, infos, target)


def _safetensors(fmt: Format, tmp: Path, stream, infos, t: Target) -> tuple[list[str], int, float]:
    meta, aliases = t.metadata, t.aliases
    files = safetensors_files(
        infos, t.fname, shard_stem=fmt.hf_stem, shard_size=t.shard_size, metadata=meta, aliases=aliases
    )
    written, t_sync = write_safetensors(tmp, stream, files, fsync=t.fsync, direct_io=t.direct_io)
    return [f.name for f in files] + write_safetensors_index(tmp, files, infos), written, t_sync


def _torch(fmt: Format, tmp: Path, stream, infos, t: Target) -> tuple[list[str], int, float]:
    return write_torch(
        tmp, stream, infos, fname=t.fname, shard_stem=fmt.hf_stem, template=t.template, aliases=t.aliases,
        shard_size=t.shard_size, fsync=t.fsync,
    )  # fmt: skip


def _dcp(fmt: Format, tmp: Path, stream, infos, t: Target) -> tuple[list[str], int, float]:
    return write_dcp(
        tmp, stream, infos, t.template, run_root=fmt.run_root, fsync=t.fsync, file_bytes=t.shard_size
    )


_ST = (".safetensors",)
REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        Format("hf-safetensors", _ST, folder=True, reader=SafetensorsFile, writer=_safetensors, ranked=True,
               hf_stem="model", checks_index=True),
        Format("hf-bin", (".bin",), folder=True, reader=TorchFile, writer=_torch, collects=True,
               hf_stem="pytorch_model", resident_reads=True),
        Format("safetensors", _ST, folder=False, reader=SafetensorsFile, writer=_safetensors, ranked=True),
        Format("torch", TORCH_SUFFIXES, folder=False, reader=TorchFile, writer=_torch, collects=True,
               resident_reads=True),
        Format("dcp", (), folder=True, reader=None, writer=_dcp, ranked=True, whole_files_per_rank=True),
        Format("megatron", (), folder=True, reader=None, writer=_dcp, ranked=True, whole_files_per_rank=True,
               run_root=True),
    )
}  # fmt: skip
FORMATS = tuple(REGISTRY)  # the format names, HF folders first (the order ``discovery`` tries them in)


def get(name: str) -> Format:
    """The format called ``name``; CheckpointError listing the formats otherwise."""
    fmt = REGISTRY.get(name)
    if fmt is None:
        raise CheckpointError(f"unknown output format {name!r}; choose one of {', '.join(REGISTRY)}")
    return fmt


def by_suffix(suffix: str) -> Format | None:
    """The file format an output path ending in ``suffix`` (exact case) is written in: .safetensors →
    safetensors, .pt/.pth/.bin/.ckpt → torch; None for any other suffix."""
    for fmt in REGISTRY.values():
        if not fmt.folder and suffix in fmt.suffixes:
            return fmt
    return None
