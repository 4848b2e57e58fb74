"""Finding checkpoints: what a path holds (an HF folder with its index and side files, a folder of one
weight file, a weight file, a DCP folder or Megatron ``torch_dist`` iteration, a run folder of
step_XXXX/, step-XXXX/, checkpoint-XXXX/ or iter_XXXXXXX/ checkpoints, or a Hugging Face Hub reference),
opened with ``open_checkpoint`` and listed oldest first by ``load_checkpoints``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import formats, safety
from .checkpoint import Checkpoint
from .dcp import is_dcp_folder, open_dcp
from .errors import CheckpointError
from .layout import WEIGHT_SUFFIXES, parse_step, record_path

__all__ = ["open_checkpoint", "load_checkpoints", "open_all", "side_files"]

# Files in a checkpoint folder or run folder that hold training state, not weights.
_STATE_STEMS = ("optim", "optimizer", "scheduler", "rng_state", "scaler", "training_args", "meta")


def _hf_formats() -> list[formats.Format]:
    """The HF folder formats, in the order a folder is tried against them."""
    return [f for f in formats.REGISTRY.values() if f.hf_stem is not None]


def _hf_weights(
    folder: Path, root: Path | None = None
) -> tuple[formats.Format, list[Path], dict | None] | None:
    """(format, weight files, index weight map or None) of an HF-style folder, or None. Every file named
    by the index must be a plain name whose real path stays inside ``root`` (default: the folder)."""
    root = folder if root is None else root
    for hf in _hf_formats():
        single, index = hf.weights_file, hf.index_file
        if (folder / index).is_file() or (folder / index).is_symlink():
            weight_map = _weight_map(folder / index, root)
            files = [safety.member(folder, f, index) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise CheckpointError(
                        f"{folder}: shard {safety.shown(f.name)} listed in {index} is missing"
                    )
                safety.regular(f, root=root)
            return hf, files, weight_map
        if (folder / single).is_file():
            return hf, [folder / single], None
    return None


def _weight_map(index: Path, root: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: an object of tensor names to shard file names (strings)."""
    doc = safety.load_json(index, root=root)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index file (no 'weight_map' object)")
    for tname, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(
                f"{index}: corrupt index file (tensor {safety.shown(tname)} maps to a non-string shard name)"
            )
    return weight_map


def _is_weight_file(p: Path) -> bool:
    name = p.name.lower()
    if not name.endswith(WEIGHT_SUFFIXES) or name.startswith("."):
        return False
    return not name.startswith(_STATE_STEMS)


def _folder_weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_weight_file(p))


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return _is_weight_file(path)
    if path.is_dir():
        return is_dcp_folder(path) or _hf_weights(path) is not None or len(_folder_weight_files(path)) == 1
    return False


def open_checkpoint(
    path: str | os.PathLike, *, name: str | None = None, step: int | None = None, root=None
) -> Checkpoint:
    """Open one checkpoint: an HF folder, a DCP folder (``.metadata`` + ``*.distcp``; a Megatron
    ``torch_dist`` iteration when it holds metadata.json), a folder holding exactly one weight file, or a
    weight file.

    Every file read must resolve inside ``root`` (default: a folder checkpoint's own folder; a run folder
    when expanding one; none for a file named directly).
    Raises CheckpointError for a path that is not a checkpoint or a corrupt/truncated one.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        root = path if root is None else Path(root)
        if is_dcp_folder(path):
            return open_dcp(path, name=name, step=step, root=root)
        hf = _hf_weights(path, root)
        if hf is not None:
            fmt, files, weight_map = hf
            sources = [fmt.reader(f, root) for f in files]
            if fmt.checks_index and weight_map is not None:
                sources = _restrict_to_index(path, sources, weight_map)
            _check_side_files(path, root)
            return Checkpoint(path, fmt.name, sources, name=name, step=step, root=root)
        files = _folder_weight_files(path)
        if len(files) != 1:
            what = "no weight files" if not files else f"{len(files)} weight files"
            raise CheckpointError(
                f"{path}: not a checkpoint ({what}; expected model.safetensors, pytorch_model.bin, a sharded "
                "index, or exactly one .safetensors/.pt/.pth/.bin file)"
            )
        safety.regular(files[0], root=root)
        inner = open_checkpoint(files[0], name=name or f"{path.name}/{files[0].name}", step=step)
        if inner.step is None:
            inner.step = parse_step(path.name)
        return inner
    if not _is_weight_file(path):
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a .safetensors, .pt, .pth, .bin or .ckpt file, or a folder)"
        )
    # A weight file by its suffix; odd-case ones (.PT, .Safetensors) are read as torch files
    fmt = formats.by_suffix(path.suffix) or formats.get("torch")
    return Checkpoint(path, fmt.name, [fmt.reader(path, root)], name=name, step=step)


def _restrict_to_index(folder: Path, sources: list, weight_map: Mapping[str, str]) -> list:
    """Keep, per shard, the tensors the index assigns to it (and check each listed tensor exists);
    ``sources`` are the shards in the order of their sorted names."""
    by_file = dict(zip(sorted(set(weight_map.values())), sources, strict=True))
    for tname, fname in weight_map.items():
        if tname not in by_file[fname].infos:
            raise CheckpointError(
                f"{folder}: tensor {safety.shown(tname)} is listed in the index but missing from "
                f"{safety.shown(fname)}"
            )
    for fname, s in by_file.items():
        s.infos = {n: i for n, i in s.infos.items() if weight_map.get(n) == fname}
    return sources


def side_files(folder: Path) -> list[Path]:
    """Config, generation config, tokenizer files ... of an HF folder: everything but weights, indexes,
    records and training state (what a merged HF folder gets a copy of)."""
    skip = {"trainer_state.json", "merge.json", *(f.index_file for f in _hf_formats())}
    out = []
    for p in sorted(folder.iterdir()):
        n = p.name
        if n.startswith(".") or n in skip or n.endswith(WEIGHT_SUFFIXES):
            continue
        if not (p.is_file() or p.is_symlink()):
            continue
        if n.lower().startswith(_STATE_STEMS) and not n.lower().startswith("meta"):
            continue  # optimizer/scheduler/rng state: meaningless for a merged model
        out.append(p)
    return out


def _check_side_files(folder: Path, root: Path) -> None:
    """Refuse side files that are links leaving ``root`` (they would be copied into the output)."""
    for p in side_files(folder):
        if not safety.inside(p, root):
            raise CheckpointError(
                f"{p}: a link that leaves the checkpoint folder {root}; refusing to read or copy it"
            )


def _is_merge_output(p: Path) -> bool:
    """Our own outputs carry a merge.json record: never mistake them for training checkpoints."""
    if p.is_dir():
        return (p / "merge.json").is_file()
    return record_path(p).is_file()


def _expand_folder(folder: Path) -> list[Checkpoint]:
    children = [
        c
        for c in sorted(folder.iterdir())
        if not c.name.startswith(".") and not _is_merge_output(c) and _is_checkpoint(c)
    ]
    if not children:
        raise CheckpointError(
            f"{folder}: not a checkpoint and holds no checkpoints (expected HF or DCP checkpoint folders "
            "such as step_XXXX/, step-XXXX/, checkpoint-XXXX/ or Megatron iter_XXXXXXX/, or .safetensors/.pt "
            "files)"
        )
    steps = [parse_step(c.name) for c in children]
    if len(children) > 1 and None in steps:
        bad = children[steps.index(None)]
        raise CheckpointError(
            f"{folder}: cannot order its checkpoints: '{bad.name}' has no step number in its name (list the "
            "checkpoints explicitly, oldest first)"
        )
    order = sorted(range(len(children)), key=lambda i: (steps[i] or 0, children[i].name))
    for i, j in zip(order, order[1:], strict=False):
        if steps[i] is not None and steps[i] == steps[j]:
            raise CheckpointError(
                f"{folder}: '{children[i].name}' and '{children[j].name}' both carry step {steps[i]}; "
                "list the checkpoints explicitly, oldest first"
            )
    # root=folder: a step folder or file that is a link leaving the run folder is refused
    return [open_checkpoint(children[i], step=steps[i], root=folder) for i in order]


_HUB_REF = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def _open_hub(ref: str) -> Checkpoint:
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{ref}: no such path, and huggingface_hub is not installed to fetch it") from e
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"],
        )
    except Exception as e:
        raise CheckpointError(
            f"{ref}: no such path, and fetching it from the Hugging Face Hub failed ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); if offline, download it first"
        ) from e
    # A hub snapshot's files are links into the repository cache's blobs/: that cache is the root.
    root = Path(folder).parents[1] if Path(folder).parent.name == "snapshots" else None
    return open_checkpoint(folder, name=ref, step=parse_step(revision) if revision else None, root=root)


def load_checkpoints(paths: Sequence[str | os.PathLike]) -> list[Checkpoint]:
    """Open checkpoints, oldest first.

    Each path is a checkpoint (see ``open_checkpoint``), a folder OF checkpoints (expanded to its children
    step_001000/, step-1000/ (torchtitan), checkpoint-2000/, iter_0003000/ (Megatron; its tracker file is
    not a checkpoint), model_004000.pt, ... sorted by the step in their names; our own merge outputs and
    optimizer/meta files are skipped), or a Hugging Face Hub reference
    ``org/name[@revision]`` fetched with huggingface_hub when online. Otherwise the given order is kept.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list[Checkpoint] = []
    for p in paths:
        path = Path(p)
        if path.exists():
            out.extend(
                [open_checkpoint(path)] if _is_checkpoint(path) or not path.is_dir() else _expand_folder(path)
            )
        elif _HUB_REF.match(str(p)) and not str(p).startswith((".", "/")):
            out.append(_open_hub(str(p)))
        else:
            raise CheckpointError(f"{p}: no such file or folder")
    if not out:
        raise CheckpointError("no checkpoints given")
    try:
        safety.distinct(c.path for c in out)
    except CheckpointError:
        for c in out:
            c.close()
        raise
    return out


def open_all(checkpoints) -> tuple[list[Checkpoint], bool]:
    """Paths (files, checkpoint folders, folders of step_* checkpoints; see ``load_checkpoints``) opened
    oldest first, or already opened Checkpoint objects passed through.

    Returns (checkpoints, opened_here): the caller closes them when ``opened_here``.
    """
    if isinstance(checkpoints, str | os.PathLike):
        checkpoints = [checkpoints]
    checkpoints = list(checkpoints)
    if checkpoints and all(isinstance(c, Checkpoint) for c in checkpoints):
        return checkpoints, False
    return load_checkpoints([str(p) for p in checkpoints]), True
