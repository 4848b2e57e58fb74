"""The checkpoint writer: ``write_checkpoint`` streams tensors into a new checkpoint of any format
(``output_layout``, ``default_format``), atomically.

It streams safetensors (header first, computed from the output infos, then each tensor's bytes as they
arrive), so a merge holds one tensor chunk in memory, not a model; large safetensors outputs are written
with direct I/O (see ``raw.FileWriter``) and shard above a size, with an HF index. PyTorch-file output
necessarily collects the whole state dict and ``torch.save``s it. Every write goes to a temporary folder
beside the output (same filesystem), is fsynced and renamed into place: an interrupted merge leaves
nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley.common.formatting import jsonable
from rivervalley.common.publish import locked, publishing

from . import formats, safety
from .checkpoint import Checkpoint
from .dcp.folder import carried_bytes as dcp_carried_bytes
from .discovery import side_files
from .dtypes import ST_RANK, TensorInfo, dtype_code, is_torch
from .errors import CheckpointError
from .layout import WEIGHT_SUFFIXES, parse_step, record_path
from .outputs import check_merge_output, check_output, publish

__all__ = [
    "WriteResult",
    "PieceStream",
    "safetensors_order",
    "default_format",
    "output_layout",
    "prepare_output",
    "output_aliases",
    "publish_checkpoint",
    "write_checkpoint",
]


@dataclass
class WriteResult:
    """What a write produced: bytes of tensor data written and the published files."""

    bytes_written: int
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    fsync_seconds: float = 0.0
    publish_seconds: float = 0.0


def safetensors_order(infos: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """``infos`` in the order safetensors.save_file lays tensors out (dtype rank descending, then name);
    a streamed file in this order is byte-identical to save_file's."""
    items = sorted(infos.items(), key=lambda kv: (-ST_RANK.get(kv[1].dtype_str, -1), kv[0]))
    return dict(items)


def default_format(output: str | os.PathLike, template: Checkpoint | None) -> str:
    """The output format when none is asked for: a .safetensors file name means one safetensors file,
    .pt/.pth/.bin/.ckpt a PyTorch file; otherwise the template's (newest input's) format family."""
    fmt = formats.by_suffix(Path(output).suffix)
    if fmt is not None:
        return fmt.name
    return template.format if template is not None else "safetensors"


def output_layout(
    output: str | os.PathLike, fmt: str, template: Checkpoint | None = None
) -> tuple[Path, str]:
    """(published path, file name) of an output: HF, DCP and Megatron formats are folders (file name '');
    ``safetensors``/``torch`` go to the given file when it ends in .safetensors/.pt/.pth/.bin/.ckpt, else
    into that folder as model.safetensors / model.pt, or under the template's file name when that carries
    no step (nanoGPT's ckpt.pt)."""
    output = Path(output)
    spec = formats.get(fmt)
    if spec.folder:
        if output.suffix in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{output}: format {fmt} writes a folder; give a folder name, not a file")
        return output, ""
    if output.suffix in WEIGHT_SUFFIXES:
        return output, output.name
    ext = spec.suffixes[0]
    keep = template is not None and spec.name == template.format and template.files
    # nanoGPT's out_dir/ckpt.pt stays ckpt.pt; a step-named file (step_000400.pt) is not reused, so the
    # merged file is not mistaken for that training checkpoint.
    name = template.files[0].name if keep else ""
    fname = name if name and parse_step(name) is None else f"model{ext}"
    return output, fname


class PieceStream:
    """Checks that (name, tensor) items arrive in ``infos`` order; a tensor (numpy array or torch tensor)
    may come in flat pieces. ``counts`` (name → elements) limits each tensor to the part of it one process
    writes (default: all of it)."""

    def __init__(
        self,
        items: Iterable[tuple[str, object]],
        infos: Mapping[str, TensorInfo],
        counts: Mapping[str, int] | None = None,
    ):
        self._it = iter(items)
        self._infos = infos
        self._counts = counts

    def pieces(self, name: str):
        """Yield the pieces of tensor ``name`` (flat, contiguous) until its numel (or count) is complete."""
        info = self._infos[name]
        need = info.numel if self._counts is None else self._counts[name]
        while True:
            if need == 0 and info.numel > 0:
                return
            try:
                got_name, t = next(self._it)
            except StopIteration:
                raise ValueError(f"tensor stream ended before tensor '{name}' was complete") from None
            if got_name != name:
                raise ValueError(f"tensor stream out of order: expected '{name}', got '{got_name}'")
            if not _has_dtype(t, info.dtype_str):
                raise ValueError(
                    f"tensor '{name}': expected dtype {info.dtype_name}, got {getattr(t, 'dtype', t)}"
                )
            numel = math.prod(t.shape)
            if numel == info.numel and tuple(t.shape) not in (info.shape, (info.numel,)):
                raise ValueError(f"tensor '{name}': expected shape {info.shape}, got {tuple(t.shape)}")
            if numel > need and info.numel > 0:
                raise ValueError(f"tensor '{name}': pieces exceed its {info.numel} elements")
            need -= numel
            yield t.reshape(-1)
            if info.numel == 0:
                return

    def finish(self) -> None:
        extra = next(self._it, None)
        if extra is not None:
            raise ValueError(f"tensor stream has an unexpected extra tensor '{extra[0]}'")


def _has_dtype(t, code: str) -> bool:
    if not (isinstance(t, np.ndarray) or is_torch(t)):
        return False
    try:
        return dtype_code(t.dtype) == code
    except (ValueError, TypeError):
        return False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hf_side_files(template: Checkpoint | None) -> list[Path]:
    """The files an HF output copies from the newest input: config, generation config, tokenizer files
    ... (everything but weights and training state) when it is an HF folder."""
    if template is None or not template.path.is_dir() or formats.get(template.format).hf_stem is None:
        return []
    # a dangling link is left out (one leaving the folder was refused when the checkpoint was opened)
    return [p for p in side_files(template.path) if p.is_file()]


def carried_bytes(template: Checkpoint | None, fmt: str) -> tuple[int, int]:
    """(bytes written, bytes held in memory at once) that an output in format ``fmt`` copies from the
    newest input ``template`` besides the merged tensors, for the merge's projection: an HF folder's side
    files, a DCP checkpoint's byte entries, a Megatron iteration's metadata.json and common.pt. Apparent
    sizes: a sparse file is written out whole."""
    spec = formats.get(fmt)
    if spec.whole_files_per_rank:  # a DCP output
        return dcp_carried_bytes(template, spec.run_root)
    files = _hf_side_files(template) if spec.hf_stem is not None else []
    return sum(safety.regular(p, root=template.root).st_size for p in files), 0


def _copy_hf_files(template: Checkpoint, folder: Path, infos: Mapping[str, TensorInfo]) -> list[str]:
    """Copy the side files of an HF template (``_hf_side_files``); only regular files inside the
    template's folder are read."""
    copied = []
    for p in _hf_side_files(template):
        safety.copy_regular(p, folder / p.name, root=template.root)
        copied.append(p.name)
    if "config.json" in copied:
        _set_config_dtype(folder / "config.json", infos)
    return copied


def _set_config_dtype(path: Path, infos: Mapping[str, TensorInfo]) -> None:
    """Keep config.json's dtype truthful (transformers loads in it), avoiding a silent dtype surprise."""
    dtypes = {i.dtype_name for i in infos.values() if i.is_float}
    if len(dtypes) != 1:
        return
    name = dtypes.pop()
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError):  # not JSON, or nested 10**5 deep: copied as it is
        return
    if not isinstance(config, dict):
        return
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == name for k in keys):
        return
    for k in keys:
        config[k] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def prepare_output(
    output: str | os.PathLike,
    fmt: str,
    template: Checkpoint | None,
    inputs: Iterable[Checkpoint | str | os.PathLike] = (),
    force: bool = False,
) -> tuple[Path, str]:
    """Check an output before writing (no overlap with the inputs, what ``force`` may replace; see
    ``outputs``) and place it (``output_layout``): returns (published path, file name)."""
    out = check_output(output, [*([template] if template is not None else []), *inputs], force=force)
    out, fname = output_layout(out, fmt, template)
    check_merge_output(out)
    return out, fname


def output_aliases(template: Checkpoint | None, infos: Mapping[str, TensorInfo]) -> dict[str, str]:
    """The template's tied names (alias → canonical tensor) whose tensor is in the output."""
    return {a: c for a, c in (template.aliases if template is not None else {}).items() if c in infos}


def publish_checkpoint(
    tmp: Path,
    out: Path,
    files: list[str],
    *,
    fmt: str,
    fname: str,
    template: Checkpoint | None,
    infos: Mapping[str, TensorInfo],
    record: Mapping | None,
    force: bool,
    fsync: bool,
) -> tuple[list[Path], float, float]:
    """Finish an output whose weight ``files`` are written in the staging folder ``tmp``: copy an HF
    template's side files, write the merge.json ``record``, fsync, and publish to ``out`` under the
    output lock (re-checking what may be replaced). Returns (published paths, fsync seconds, publish
    seconds); the caller's ``publishing`` block removes ``tmp`` afterwards."""
    files = list(files)
    t_sync = 0.0
    folder_out = not fname or out.suffix not in WEIGHT_SUFFIXES  # HF, DCP and Megatron: fname ''
    if formats.get(fmt).hf_stem is not None and template is not None:
        files += _copy_hf_files(template, tmp, infos)
    rec_name = "merge.json" if folder_out else record_path(out).name
    if record is not None:
        (tmp / rec_name).write_text(json.dumps(jsonable(dict(record)), indent=1) + "\n")
        files.append(rec_name)
    if fsync:
        t0 = time.perf_counter()
        _fsync_path(tmp)
        t_sync += time.perf_counter() - t0
    t_publish = time.perf_counter()
    with locked(out):  # a concurrent merge to the same output publishes before or after us
        checked = check_merge_output(out)  # again: another run may have published there while we merged
        if folder_out:
            publish(tmp, out, force, expect=checked[out])
            published = [out / f for f in files]
        else:
            if record is not None:  # vetted by check_merge_output
                publish(tmp / rec_name, record_path(out), True, expect=checked[record_path(out)])
            publish(tmp / fname, out, force, expect=checked[out])
            tmp.rmdir()
            published = [out] + ([record_path(out)] if record is not None else [])
    if fsync:
        _fsync_path(out.parent)
    return published, t_sync, time.perf_counter() - t_publish


def write_checkpoint(
    output: str | os.PathLike,
    tensors: Iterable[tuple[str, object]],
    *,
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None = None,
    fmt: str | None = None,
    shard_size: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    record: Mapping | None = None,
    force: bool = False,
    inputs: Iterable[Checkpoint | str | os.PathLike] = (),
    fsync: bool = True,
    direct_io: bool | None = None,
) -> WriteResult:
    """Stream ``tensors`` into a new checkpoint at ``output``, atomically.

    ``infos`` are the output tensors (names, shapes, dtypes) in write order, known before the first tensor
    arrives; ``tensors`` yields (name, tensor) in that order (numpy arrays or torch tensors), where a
    tensor may also come as consecutive flat pieces whose sizes add up. Each item is consumed before the
    next is requested, so a producer may reuse its buffers. ``fmt`` defaults to
    ``default_format(output, template)``. ``template`` (the newest input) gives the config and tokenizer
    files copied into HF folders, and the nesting, non-tensor entries and tied aliases of torch files.
    Safetensors outputs shard above ``shard_size`` bytes (HF index json); torch outputs are one file.
    ``metadata`` goes into the safetensors header; ``record`` is written as merge.json beside the output.

    The output is built in a temporary folder beside it, fsynced, then renamed into place (``force``
    replaces an existing output: old renamed aside, new renamed in, old deleted). On any exception the
    temporary folder is removed and nothing is published. Inputs (``template`` and ``inputs``) are never
    written, and an output equal to, inside, or containing one of them is refused. ``direct_io`` writes
    safetensors files with O_DIRECT (None: when fsync is on and the file has at least
    DIRECT_IO_MIN_BYTES).
    """
    t_start = time.perf_counter()
    fmt = fmt or default_format(output, template)
    out, fname = prepare_output(output, fmt, template, inputs, force)
    infos = dict(infos)
    aliases = output_aliases(template, infos)
    with publishing(out, commit=None) as tmp:  # publish_checkpoint publishes, under the output lock
        stream = PieceStream(tensors, infos)
        target = formats.Target(fname, template, aliases, shard_size, metadata, fsync, direct_io)
        files, written, t_sync = formats.get(fmt).write(tmp, stream, infos, target)
        stream.finish()
        published, t_fin, t_publish = publish_checkpoint(
            tmp, out, files, fmt=fmt, fname=fname, template=template, infos=infos, record=record,
            force=force, fsync=fsync,
        )  # fmt: skip
        t_sync += t_fin
    return WriteResult(written, published, time.perf_counter() - t_start, t_sync, t_publish)
