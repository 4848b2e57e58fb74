"""The write phase of a merge run by several processes (``write_ranked``).

Rank 0 checks the output and creates the staging folder beside it; the ranks learn the folder's path.

* safetensors (a file or an HF folder): rank 0 also creates every output file at its final size with its
  header (the layout of ``io.shards.safetensors_files``, the one the one-process writer streams); each
  rank writes the merged bytes of its own units at their offsets and fsyncs; rank 0 writes the index.
* DCP and Megatron folders: the output's ``.distcp`` files (the layout of ``io.dcp.plan_output``, the one
  the one-process writer uses) are shared out whole, balanced by bytes (``dcp_share``); each rank merges
  only the tensor elements in its files and writes them (``io.dcp.write_files``); the storage entries
  come to rank 0 as JSON, which writes ``.metadata`` and the Megatron files (``io.dcp.finish_output``).

Then rank 0 writes side files and merge.json and publishes (``io.writer.publish_checkpoint``, under the
output lock). Each step ends with ``distributed.agreed``: a failure on any rank fails every rank, and
rank 0 removes the staging folder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rivervalley.common.publish import publishing

from .. import distributed
from ..io import Checkpoint, TensorInfo, WriteResult, formats, output_layout
from ..io.dcp import (
    DcpOutput,
    chunk_feed,
    finish_output,
    plan_output,
    write_files,
    written_from_json,
    written_json,
)
from ..io.ranged import RangedWriter, create_files
from ..io.shards import FileLayout, safetensors_files, write_safetensors_index
from ..io.writer import PieceStream, output_aliases, prepare_output, publish_checkpoint

__all__ = ["DcpShare", "dcp_share", "one_process_only", "write_ranked"]

Segments = Sequence[list[tuple[str, int, int]]]


def one_process_only(fmt: str) -> str:
    """The error message for an output format several processes cannot write."""
    return (
        f"output format {fmt} is written by one process: run without torchrun/srun, or write safetensors "
        "(a .safetensors file or an hf-safetensors folder) or a DCP or Megatron folder"
    )


@dataclass(frozen=True)
class DcpShare:
    """This rank's part of a DCP or Megatron output: the output's ``layout``, the ``files`` (numbers) this
    rank writes, and the elements [start, stop) of each tensor (``extent``) those files hold."""

    layout: DcpOutput
    files: range
    extent: dict[str, tuple[int, int]]


def dcp_share(
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None,
    *,
    fmt: str,
    shard_size: int,
    group: distributed.Group | None = None,
) -> DcpShare:
    """This rank's whole files of the DCP output of ``infos`` (files of at most about ``shard_size``
    bytes), a contiguous block balanced by bytes (``distributed.rank_block``)."""
    layout = plan_output(infos, template, run_root=formats.get(fmt).run_root, file_bytes=shard_size)
    files = distributed.rank_block(layout.file_bytes(infos), group)
    extent: dict[str, tuple[int, int]] = {}
    for c in (c for k in files for c in layout.files[k]):
        a, b = extent.get(c.name, (c.start, c.stop))
        extent[c.name] = (min(a, c.start), max(b, c.stop))  # a rank's chunks of a tensor are contiguous
    return DcpShare(layout, files, extent)


def _checked(units: Segments, pieces: Iterator[tuple[str, np.ndarray]]):
    """(name, start, piece) for each segment of ``units``, checking ``pieces`` come one per segment."""
    segments = (seg for segs in units for seg in segs)
    for (name, a, b), (got, arr) in zip(segments, pieces, strict=True):
        if got != name or arr.size != b - a:
            raise RuntimeError(f"merge produced {got} for segment {name}[{a}:{b}]")
        yield name, a, arr


def _staging(group, stage, output, fmt, template, inputs, force, files: Sequence[FileLayout] = ()):
    """Rank 0 checks the output and creates the staging folder (with ``files`` preallocated), held by the
    ExitStack ``stage``: closing it removes the folder (rank 0 publishes it before, through
    ``publish_checkpoint``). Every rank learns the folder's path. Returns (published path, staging folder:
    both on rank 0 only, the folder's path)."""
    out = tmp = None
    with distributed.agreed(group):
        if group.leader:
            out, _ = prepare_output(output, fmt, template, inputs, force)
            tmp = stage.enter_context(publishing(out, commit=None))
            create_files(tmp, files)
    folder = Path(os.fsdecode(group.broadcast_bytes(os.fsencode(tmp) if tmp is not None else None)))
    return out, tmp, folder


def _safetensors_part(folder: Path, files, units: Segments, pieces, infos, fsync: bool) -> float:
    """Write this rank's pieces at their offsets of the preallocated ``files``; returns seconds in fsync."""
    writer = RangedWriter(folder, files, writeback=fsync)
    try:
        for name, a, arr in _checked(units, pieces):
            writer.write(name, a * infos[name].itemsize, memoryview(arr.reshape(-1).view(np.uint8)))
        return writer.close(fsync)
    finally:
        writer.abort()


def _dcp_part(folder: Path, share: DcpShare, units: Segments, pieces, infos, template, fsync: bool):
    """Write this rank's whole ``.distcp`` files; returns (their storage entries as JSON, seconds in
    fsync)."""
    counts = {n: b - a for n, (a, b) in share.extent.items()}
    stream = PieceStream(((n, arr) for n, _, arr in _checked(units, pieces)), infos, counts)
    data = chunk_feed(stream.pieces, infos)
    stored, _, t_sync = write_files(folder, share.layout, share.files, data, template, fsync=fsync)
    stream.finish()
    return written_json(stored), t_sync


def write_ranked(
    group: distributed.Group,
    units: Segments,
    pieces: Iterator[tuple[str, np.ndarray]],
    *,
    output: Path,
    fmt: str,
    template: Checkpoint | None,
    infos: Mapping[str, TensorInfo],
    shard_size: int,
    metadata: Mapping[str, str] | None,
    record: Mapping | None,
    force: bool,
    inputs: Iterable[Checkpoint],
    fsync: bool,
    share: DcpShare | None = None,
) -> WriteResult:
    """Write this rank's ``units`` (segments (name, start, stop) in elements) from ``pieces`` (one flat
    array per segment, in order) into the output every rank writes a part of; collective. A DCP or
    Megatron output needs this rank's ``share`` (``dcp_share``), from which ``units`` were cut. Returns
    the whole output's bytes and, on rank 0, the published files."""
    spec = formats.REGISTRY.get(fmt)
    if spec is None or not spec.ranked:
        raise ValueError(one_process_only(fmt))
    dcp = spec.whole_files_per_rank
    if dcp and share is None:
        raise ValueError(f"a {fmt} output written by several processes needs each rank's share")
    t_start = time.perf_counter()
    fname = output_layout(output, fmt, template)[1]
    files = []
    if not dcp:
        aliases = output_aliases(template, infos)
        files = safetensors_files(
            infos, fname, shard_stem=spec.hf_stem, shard_size=shard_size, metadata=metadata, aliases=aliases
        )
    with contextlib.ExitStack() as stage:  # rank 0 only: the staging folder, removed when it closes
        out, tmp, folder = _staging(group, stage, output, fmt, template, inputs, force, files)
        published: list[Path] = []
        t_publish = 0.0
        with distributed.agreed(group):
            if dcp:
                entries, t_sync = _dcp_part(folder, share, units, pieces, infos, template, fsync)
            else:
                t_sync = _safetensors_part(folder, files, units, pieces, infos, fsync)
        gathered = group.all_gather_bytes(entries) if dcp else []  # no pickle: JSON bytes
        with distributed.agreed(group):
            if group.leader:
                if dcp:
                    stored = [w for raw in gathered for w in written_from_json(raw)]  # in file order
                    names, t_fin = finish_output(tmp, share.layout, infos, template, stored, fsync=fsync)
                else:
                    names, t_fin = [f.name for f in files] + write_safetensors_index(tmp, files, infos), 0.0
                published, t_more, t_publish = publish_checkpoint(
                    tmp, out, names, fmt=fmt, fname=fname, template=template, infos=infos, record=record,
                    force=force, fsync=fsync,
                )  # fmt: skip
                t_sync += t_fin + t_more
    written = sum(i.nbytes for i in infos.values())
    return WriteResult(written, published, time.perf_counter() - t_start, t_sync, t_publish)
