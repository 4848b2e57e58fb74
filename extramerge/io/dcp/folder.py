"""DCP and Megatron ``torch_dist`` checkpoint folders: recognising one (``is_dcp_folder``), opening it as a
``Checkpoint`` (``open_dcp``), and writing a merged one (``write_output``: a DCP folder, or a Megatron run
root holding ``latest_checkpointed_iteration.txt`` and ``iter_XXXXXXX/``).

A Megatron iteration folder is a DCP folder with ``metadata.json`` ({"sharded_backend": "torch_dist"})
and, in older releases, ``common.pt`` (argparse arguments: a pickle, never loaded here, copied byte for
byte into a merged iteration). Keys of training state (``optimizer.…``, ``lr_scheduler``, ...) are not
merged: they are counted in ``Checkpoint.state_tensors`` and left out of a merged checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from .. import safety
from ..checkpoint import Checkpoint
from ..dtypes import TensorInfo
from ..errors import CheckpointError
from ..layout import (
    DCP_METADATA,
    MEGATRON_COMMON,
    MEGATRON_CONFIG,
    MEGATRON_TRACKER,
    WEIGHT_SUFFIXES,
    is_training_state,
    megatron_iteration,
)
from .metadata import read_index
from .save import FILE_BYTES, chunk_feed, distcp_name, plan_dcp, write_distcp, write_metadata
from .source import DcpSource

__all__ = ["is_dcp_folder", "megatron_backend", "open_dcp", "write_output"]


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / DCP_METADATA).is_file()


def megatron_backend(folder: Path, root: Path | None = None) -> str | None:
    """The ``sharded_backend`` named by a Megatron iteration's metadata.json, or None without one."""
    if not (folder / MEGATRON_CONFIG).is_file():
        return None
    doc = safety.load_json(folder / MEGATRON_CONFIG, root=root or folder)
    backend = doc.get("sharded_backend") if isinstance(doc, dict) else None
    if not isinstance(backend, str):
        raise CheckpointError(f"{folder / MEGATRON_CONFIG}: no 'sharded_backend' string")
    return backend


def open_dcp(folder: Path, *, name: str | None = None, step: int | None = None, root=None) -> Checkpoint:
    """Open a DCP folder (format 'dcp') or Megatron ``torch_dist`` iteration (format 'megatron'): its
    ``.metadata`` only; tensor chunks are located on first use."""
    folder = Path(folder)
    root = folder if root is None else Path(root)
    backend = megatron_backend(folder, root)
    if backend is not None and backend != "torch_dist":
        raise CheckpointError(
            f"{folder}: a Megatron checkpoint saved with the {safety.shown(backend)} backend; extramerge "
            "reads torch_dist (re-save with --ckpt-format torch_dist)"
        )
    source = DcpSource(folder, read_index(folder, root), root=root, keep=lambda k: not is_training_state(k))
    if not source.infos:
        raise CheckpointError(f"{folder}: a DCP checkpoint without model tensors (only training state)")
    fmt = "dcp" if backend is None else "megatron"
    return Checkpoint(folder, fmt, [source], name=name, step=step, root=root)


def _template_source(template: Checkpoint | None) -> DcpSource | None:
    srcs = template.sources if template is not None else ()
    return srcs[0] if len(srcs) == 1 and isinstance(srcs[0], DcpSource) else None


def write_output(
    tmp: Path,
    stream,
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None,
    *,
    fmt: str,
    fsync: bool,
    file_bytes: int = FILE_BYTES,
    output: Path | None = None,
) -> tuple[list[str], int, float]:
    """Write the merged tensors (``stream.pieces(name)``: each tensor's flat pieces, in ``infos`` order)
    as a DCP folder into the staging folder ``tmp``: format 'dcp' there, 'megatron' as a run root with a
    tracker file and one iteration folder (the newest input's step; its metadata.json and common.pt
    copied). The newest input's byte entries are copied when it is a DCP checkpoint. Returns (files
    written, relative to ``tmp``; tensor bytes; seconds in fsync). ``output`` (the published path) must
    name a folder."""
    if output is not None and Path(output).suffix in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{output}: format {fmt} writes a folder; give a folder name, not a file")
    src = _template_source(template)
    folder, prefix, files = tmp, "", []
    if fmt == "megatron":
        step = template.step if template is not None and template.step is not None else 0
        prefix = megatron_iteration(step) + "/"
        folder = tmp / prefix
        folder.mkdir()
        (tmp / MEGATRON_TRACKER).write_text(f"{step}\n")
        files.append(MEGATRON_TRACKER)
    plan = plan_dcp(infos, file_bytes=file_bytes)
    objects = [(n, src.object_bytes(n)) for n in src.objects] if src is not None else []
    data = chunk_feed(stream.pieces, infos)
    stored, written, t_sync = [], 0, 0.0
    for k, chunks in enumerate(plan):
        got, nbytes, dt = write_distcp(folder, k, chunks, data, objects if k == 0 else (), fsync=fsync)
        stored += got
        written += nbytes
        t_sync += dt
        files.append(prefix + distcp_name(k))
    planner = src.index.planner_data if src is not None else None
    t_sync += write_metadata(folder, infos, plan, stored, planner, fsync=fsync)
    files.append(prefix + DCP_METADATA)
    if fmt == "megatron":
        files += [prefix + f for f in _copy_megatron_files(template, folder)]
    return files, written, t_sync


def _copy_megatron_files(template: Checkpoint | None, folder: Path) -> list[str]:
    """metadata.json (or a torch_dist one) and common.pt of the newest input, byte for byte."""
    copied = []
    src = template.path if template is not None and template.format == "megatron" else None
    for fname in (MEGATRON_CONFIG, MEGATRON_COMMON):
        if src is not None and (src / fname).is_file():
            safety.regular(src / fname, root=template.root)
            shutil.copyfile(src / fname, folder / fname)
            copied.append(fname)
    if MEGATRON_CONFIG not in copied:
        (folder / MEGATRON_CONFIG).write_text(
            '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}'
        )
        copied.append(MEGATRON_CONFIG)
    return copied
