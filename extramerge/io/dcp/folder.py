"""DCP and Megatron ``torch_dist`` checkpoint folders: recognising one (``is_dcp_folder``), opening it as a
``Checkpoint`` (``open_dcp``), and writing a merged one (``write_output``: a DCP folder, or a Megatron run
root holding ``latest_checkpointed_iteration.txt`` and ``iter_XXXXXXX/``; by one process, or by several
through its parts ``plan_output``, ``write_files`` and ``finish_output``).

A Megatron iteration folder is a DCP folder with ``metadata.json`` ({"sharded_backend": "torch_dist"})
and, in older releases, ``common.pt`` (argparse arguments: a pickle, never loaded here, copied byte for
byte into a merged iteration). Keys of training state (``optimizer.…``, ``lr_scheduler``, ...) are not
merged: they are counted in ``Checkpoint.state_tensors`` and left out of a merged checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    is_training_state,
    megatron_iteration,
)
from .metadata import read_index
from .save import (
    FILE_BYTES,
    OutChunk,
    Written,
    chunk_feed,
    distcp_name,
    plan_dcp,
    write_distcp,
    write_metadata,
)
from .source import DcpSource

__all__ = [
    "DcpOutput",
    "is_dcp_folder",
    "megatron_backend",
    "open_dcp",
    "plan_output",
    "write_files",
    "finish_output",
    "write_output",
]


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


@dataclass(frozen=True)
class DcpOutput:
    """The layout of a merged DCP output inside its staging folder: ``run_root`` (a Megatron run root), the
    folder of the DCP files (``prefix``: '' for a DCP folder, the iteration folder 'iter_XXXXXXX/' in a run
    root), that iteration's ``step``, and the chunks of each ``.distcp`` file (``plan_dcp``)."""

    run_root: bool
    prefix: str
    step: int
    files: list[list[OutChunk]]

    def file_bytes(self, infos: Mapping[str, TensorInfo]) -> list[int]:
        """Tensor bytes of each file."""
        return [sum((c.stop - c.start) * infos[c.name].itemsize for c in f) for f in self.files]


def plan_output(
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None,
    *,
    run_root: bool = False,
    file_bytes: int = FILE_BYTES,
) -> DcpOutput:
    """The layout of a merge written as a DCP folder, or with ``run_root`` as a Megatron run root whose
    iteration is the newest input's step."""
    step = template.step if template is not None and template.step is not None else 0
    prefix = megatron_iteration(step) + "/" if run_root else ""
    return DcpOutput(run_root, prefix, step, plan_dcp(infos, file_bytes=file_bytes))


def carried_bytes(template: Checkpoint | None, run_root: bool) -> tuple[int, int]:
    """(bytes written, bytes held in memory) that a DCP output copies from the newest input besides the
    merged tensors: its byte entries (their lengths, whatever a sparse file stores; read into memory
    together while file 0 is written) and, in a run root, its metadata.json and common.pt."""
    src = _template_source(template)
    if src is None:
        return 0, 0
    held = sum(blob.length for blob in src.objects.values())
    total = held
    if run_root and megatron_backend(template.path, template.root) is not None:
        for fname in (MEGATRON_CONFIG, MEGATRON_COMMON):
            if (template.path / fname).is_file():
                total += safety.regular(template.path / fname, root=template.root).st_size
    return total, held


def write_files(
    tmp: Path,
    layout: DcpOutput,
    ks: Iterable[int],
    data,
    template: Checkpoint | None,
    *,
    fsync: bool,
) -> tuple[list[Written], int, float]:
    """Write files ``ks`` of ``layout`` into the staging folder ``tmp`` (chunk data from ``data(chunk)``,
    in order; file 0 first holds the newest input's byte entries when it is a DCP checkpoint). Other
    processes may write the other files at the same time. Returns (storage entries, tensor bytes, seconds
    in fsync)."""
    folder = tmp / layout.prefix
    folder.mkdir(exist_ok=True)
    src = _template_source(template)
    stored, written, t_sync = [], 0, 0.0
    for k in ks:
        objects = [(n, src.object_bytes(n)) for n in src.objects] if src is not None and k == 0 else []
        got, nbytes, dt = write_distcp(folder, k, layout.files[k], data, objects, fsync=fsync)
        stored += got
        written += nbytes
        t_sync += dt
    return stored, written, t_sync


def finish_output(
    tmp: Path,
    layout: DcpOutput,
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None,
    stored: Iterable[Written],
    *,
    fsync: bool,
) -> tuple[list[str], float]:
    """After every file of ``layout`` is written (``stored``: the storage entries of all of them, in file
    order): write ``.metadata`` and, in a run root, the tracker file and the newest input's metadata.json
    and common.pt. Returns (every file of the output, relative to ``tmp``; seconds in fsync)."""
    folder = tmp / layout.prefix
    folder.mkdir(exist_ok=True)
    src = _template_source(template)
    planner = src.index.planner_data if src is not None else None
    t_sync = write_metadata(folder, infos, layout.files, stored, planner, fsync=fsync)
    files = [layout.prefix + distcp_name(k) for k in range(len(layout.files))] + [
        layout.prefix + DCP_METADATA
    ]
    if layout.run_root:
        (tmp / MEGATRON_TRACKER).write_text(f"{layout.step}\n")
        files = [
            MEGATRON_TRACKER,
            *files,
            *(layout.prefix + f for f in _copy_megatron_files(template, folder)),
        ]
    return files, t_sync


def write_output(
    tmp: Path,
    stream,
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None,
    *,
    run_root: bool = False,
    fsync: bool,
    file_bytes: int = FILE_BYTES,
) -> tuple[list[str], int, float]:
    """Write the merged tensors (``stream.pieces(name)``: each tensor's flat pieces, in ``infos`` order)
    as a DCP folder into the staging folder ``tmp``, in one process: there, or with ``run_root`` as a
    Megatron run root with a tracker file and one iteration folder (the newest input's step; its
    metadata.json and common.pt copied). The newest input's byte entries are copied when it is a DCP
    checkpoint. Returns (files written, relative to ``tmp``; tensor bytes; seconds in fsync). Several
    processes write the same output with ``plan_output``, ``write_files`` (each its own files) and
    ``finish_output`` (one of them)."""
    layout = plan_output(infos, template, run_root=run_root, file_bytes=file_bytes)
    data = chunk_feed(stream.pieces, infos)
    stored, written, t_sync = write_files(tmp, layout, range(len(layout.files)), data, template, fsync=fsync)
    files, t_fin = finish_output(tmp, layout, infos, template, stored, fsync=fsync)
    return files, written, t_sync + t_fin


def _copy_megatron_files(template: Checkpoint | None, folder: Path) -> list[str]:
    """metadata.json (or a torch_dist one) and common.pt of the newest input when it is a Megatron
    iteration (``megatron_backend``, the rule ``open_dcp`` names the format by), byte for byte."""
    copied = []
    dcp_in = _template_source(template) is not None
    megatron_in = dcp_in and megatron_backend(template.path, template.root) is not None  # open_dcp's rule
    src = template.path if megatron_in else None
    for fname in (MEGATRON_CONFIG, MEGATRON_COMMON):
        if src is not None and (src / fname).is_file():
            safety.copy_regular(src / fname, folder / fname, root=template.root)
            copied.append(fname)
    if MEGATRON_CONFIG not in copied:
        (folder / MEGATRON_CONFIG).write_text(
            '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}'
        )
        copied.append(MEGATRON_CONFIG)
    return copied
