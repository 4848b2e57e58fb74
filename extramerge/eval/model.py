"""Models for evaluation: checking and loading a local Hugging Face causal-LM folder safely (with its
tokenizer, possibly in the run folder above), the model's context length, and where and how it runs."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from ..io import formats, open_checkpoint, safety

__all__ = [
    "check_model_folder",
    "load_model",
    "max_positions",
    "tokenizer_folder",
    "tokenizer_files",
    "tokenizer_fingerprint",
    "resolve_device",
    "autocast",
]

_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_TOKENIZER_FILES = (*_TOKENIZER_NAMES, "merges.txt", "special_tokens_map.json", "added_tokens.json")


# ------------------------------------------------------------------------------------------- folders


def tokenizer_folder(folder: Path) -> Path | None:
    """The model folder itself, else its parent (a run folder holding one tokenizer for all steps)."""
    for f in (folder, folder.parent):
        if any((f / n).is_file() for n in _TOKENIZER_NAMES):
            return f
    return None


def check_model_folder(path: str | os.PathLike, *, tokenizer: bool = True) -> Path:
    """Check that ``path`` is a Hugging Face causal-LM folder (config.json + weights + tokenizer files,
    the tokenizer possibly in the parent folder) without loading it; ValueError naming the path.

    As the merge reader checks a folder: no entry is a link leaving it or a special file, config.json is
    bounded, strict JSON, and every weight file (all those the index names, in subfolders too) is a regular
    file inside the folder, checked by ``extramerge.io.open_checkpoint`` itself."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or folder")
    if not p.is_dir():
        raise ValueError(f"{p}: not a model folder (expected a folder with config.json and weights)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p}: not a Hugging Face model folder (no config.json)")
    if not any((p / n).is_file() for n in _WEIGHT_NAMES):
        raise ValueError(f"{p}: no model weights (expected model.safetensors or pytorch_model.bin)")
    if tokenizer and tokenizer_folder(p) is None:
        raise ValueError(f"{p}: no tokenizer (expected tokenizer.json or tokenizer_config.json)")
    safety.folder_files(p)  # no links leaving the folder, no FIFOs, before transformers opens anything
    if tokenizer and tokenizer_folder(p) != p:
        safety.folder_files(p.parent, _TOKENIZER_FILES)
    # transformers parses config.json with the stdlib json (100k nested '[' is a RecursionError there)
    if not isinstance(safety.load_json(p / "config.json", root=p), dict):
        raise ValueError(f"{p / 'config.json'}: not a JSON object")
    _check_weights(p)
    return p


def _check_weights(folder: Path) -> None:
    """The merge reader's own check of the weights: every file the index names (in subfolders too) is a
    regular file whose real path stays inside the folder, and each opens as a checkpoint (headers only)."""
    with open_checkpoint(folder) as ckpt:
        if formats.get(ckpt.format).hf_stem is None:  # e.g. a DCP folder: transformers reads other files
            raise ValueError(f"{folder}: not a Hugging Face model folder (its weights are {ckpt.format})")


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer files a model folder uses (in it, or in its run folder)."""
    folder = tokenizer_folder(Path(path))
    return [] if folder is None else [folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()]


def tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """Hash of the tokenizer files of a model folder (equal hashes → identical token blocks)."""
    files = tokenizer_files(path)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike, *, device=None, dtype=None):
    """``(model, tokenizer)`` from a local HF folder via AutoModelForCausalLM / AutoTokenizer
    (``local_files_only=True``); the tokenizer may sit in the parent folder. ValueError naming the path
    when the folder is not a loadable causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = check_model_folder(path)
    hf_logging.disable_progress_bar()
    # trust_remote_code=False: a folder's own .py (config.json's auto_map) never runs, and transformers
    # never asks on stdin whether to run it
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tok = AutoTokenizer.from_pretrained(
            tokenizer_folder(p), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise ValueError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {_first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    except Exception as e:
        raise ValueError(f"{p}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ------------------------------------------------------------------------------------------- running


def max_positions(model) -> int | None:
    """Longest sequence the model accepts: config ``n_positions``, ``max_position_embeddings`` or
    ``n_ctx`` (the order lm-eval uses); None when the config states none."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_device(model, device):
    """The device to evaluate on: ``device`` (the model is moved there), or by default the model's own."""
    import torch

    if device is None:
        try:
            return next(model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


def autocast(device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
