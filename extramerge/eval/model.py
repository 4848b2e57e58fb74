"""Models for evaluation: checking and loading a local Hugging Face causal-LM folder safely (with its
tokenizer, possibly in the run folder above), the model's context length, and where and how it runs."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import formats, open_checkpoint, safety

__all__ = [
    "DEFAULT_SEQ_LEN",
    "check_model_folder",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "max_positions",
    "seq_len_of",
    "packed_inputs",
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
DEFAULT_SEQ_LEN = 1024  # tokens per block when the config states no maximum (BLOOM's ALiBi has none)


# ------------------------------------------------------------------------------------------- folders


def tokenizer_folder(folder: Path) -> Path | None:
    """The model folder itself, else its parent (a run folder holding one tokenizer for all steps)."""
    for f in (folder, folder.parent):
        if any((f / n).is_file() for n in _TOKENIZER_NAMES):
            return f
    return None


def check_model_folder(path: str | os.PathLike, *, tokenizer: bool = True, root=None) -> Path:
    """Check that ``path`` is a Hugging Face causal-LM folder (config.json + weights + tokenizer files,
    the tokenizer possibly in the parent folder) without loading it; ValueError naming the path.

    As the merge reader checks a folder: no entry is a link leaving it (or ``root``, a folder above it: a hub
    cache's repository folder, whose snapshots link into its blobs/) or a special file, config.json is
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
    root = p if root is None else Path(root)
    if root == p:
        safety.folder_files(p)  # no links leaving the folder, no FIFOs, before transformers opens anything
    else:
        _entries_inside(p, root)
    if tokenizer and tokenizer_folder(p) != p:
        safety.folder_files(p.parent, _TOKENIZER_FILES)
    # transformers parses config.json with the stdlib json (100k nested '[' is a RecursionError there)
    if not isinstance(safety.load_json(p / "config.json", root=root), dict):
        raise ValueError(f"{p / 'config.json'}: not a JSON object")
    _check_weights(p, root)
    return p


def _entries_inside(folder: Path, root: Path) -> None:
    """``safety.folder_files`` with the bound at ``root``: every entry of ``folder`` resolves inside ``root``
    and is a regular file or a folder."""
    if not safety.inside(folder, root):
        raise ValueError(f"{folder}: not inside {root}")
    for e in folder.iterdir():
        if e.name.startswith(".") or not (e.exists() or e.is_symlink()):
            continue
        if e.is_dir() and safety.inside(e, root):
            continue
        safety.regular(e, root=root)  # a link leaving root, a FIFO or a device: CheckpointError


def _check_weights(folder: Path, root: Path | None = None) -> None:
    """The merge reader's own check of the weights: every file the index names (in subfolders too) is a
    regular file whose real path stays inside the folder (or ``root``), and each opens as a checkpoint
    (headers only)."""
    with open_checkpoint(folder, root=root) as ckpt:
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


def load_model(path: str | os.PathLike, *, device=None, dtype=None, root=None):
    """``(model, tokenizer)`` from a local HF folder via AutoModelForCausalLM / AutoTokenizer
    (``local_files_only=True``); the tokenizer may sit in the parent folder. ValueError naming the path
    when the folder is not a loadable causal LM; ``root``: see ``check_model_folder``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    p = check_model_folder(path, root=root)
    hf_logging.disable_progress_bar()
    # trust_remote_code=False: a folder's own .py (config.json's auto_map) never runs, and transformers
    # never asks on stdin whether to run it
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tok = load_tokenizer(tokenizer_folder(p), name=p, check=False)  # check_model_folder checked its files
    try:
        model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    except Exception as e:
        raise ValueError(f"{p}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def load_tokenizer(folder: str | os.PathLike, *, name=None, check: bool = True):
    """The tokenizer of a folder holding tokenizer files, via AutoTokenizer (``local_files_only``, no remote
    code); ``check``: its tokenizer files that are links leaving the folder or special files are refused
    first. ValueError naming ``name`` (default the folder) when it does not load."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if check:
        safety.folder_files(folder, _TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        what = name if name is not None else folder
        raise ValueError(
            f"{what}: cannot load the tokenizer ({type(e).__name__}: {_first_line(e)})"
        ) from None


def load_weights(model, state: Mapping[str, Any]) -> None:
    """Put ``state`` (tensors keyed by a checkpoint's own names) into ``model`` as ``from_pretrained`` puts
    that checkpoint: through transformers' own loader, which renames and converts the keys by the model's
    registered conversions (5.x: GPT-NeoX's ``embed_out`` → ``lm_head``, fused or split tensors; legacy
    ``gamma``/``beta``; an added or dropped base-model prefix), casts each tensor to its parameter's dtype on
    the model's device, then ties the weights the model ties. A value may be lazy: anything ``value[...]``
    turns into the tensor, materialised just before it is set, one at a time. ValueError naming the first
    tensors the model does not have, parameters ``state`` lacks, or tensors of another shape.

    Loading the newest checkpoint with ``load_model`` and every merge with this function is one key policy:
    transformers' own, of the installed version (5.x: ``core_model_loading``; 4.x: the steps of
    ``PreTrainedModel._load_pretrained_model``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # transformers 4.x
        return _load_weights_v4(model, state)
    from transformers.utils import logging as hf_logging

    device = next(model.parameters()).device
    config = LoadStateDictConfig(device_map={"": device}, weight_mapping=get_model_conversion_mapping(model))
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for each merge
    try:
        info, _ = convert_and_load_state_dict_in_model(model, dict(state), config)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # the keys from_pretrained itself lets pass (old rotary buffers, ...)
        adjust(info)
    params = dict(model.named_parameters(remove_duplicate=False))
    _refuse_keys(
        unexpected=sorted(info.unexpected_keys),
        missing=sorted(k for k in info.missing_keys if k in params),
        mismatched=sorted(k[0] for k in info.mismatched_keys),
        errors=sorted(info.conversion_errors),
    )


def _load_weights_v4(model, state: Mapping[str, Any]) -> None:
    """transformers 4.x: the steps ``_load_pretrained_model`` takes for an in-memory state dict, on a model
    already built: its key renaming (``_get_key_renaming_mapping``: legacy names, the class's
    ``_checkpoint_conversion_mapping`` where ``from_pretrained`` applies it, a base-model prefix added or
    dropped), its missing and unexpected keys (tied groups, non-persistent buffers, old rotary buffers, the
    class's ignore lists), its shape check (as with ``ignore_mismatched_sizes``, to refuse instead), then
    ``_load_state_dict_into_meta_model`` casting and placing each tensor, and ``tie_weights``. Everything is
    checked before anything is set; the initialisation of weights the state lacks is not run (they are
    refused). These helpers are private and their signatures differ between 4.56 and 4.57: each is called
    with the keywords it takes."""
    import torch
    from transformers import modeling_utils as hf

    cls = type(model)
    keys = list(state)
    prefix = model.base_model_prefix
    has_prefix = len(prefix) > 0 and any(k.startswith(prefix) for k in keys)
    expects_prefix = len(prefix) > 0 and hasattr(model, prefix)
    task_from_base = not has_prefix and expects_prefix
    base_from_task = has_prefix and not expects_prefix
    vlm = any(n in c.__name__.lower() for c in cls.__mro__[:-1] for n in hf.VLMS)
    key_mapping = cls._checkpoint_conversion_mapping if vlm else None  # as from_pretrained chooses it
    renaming = model._get_key_renaming_mapping(keys, key_mapping, base_from_task, task_from_base)
    missing, unexpected = _call(
        hf._find_missing_and_unexpected_keys,
        cls=cls,
        model=model,
        original_checkpoint_keys=keys,
        checkpoint_keys=list(renaming.values()),
        loading_base_model_from_task_state_dict=base_from_task,
        hf_quantizer=None,
        device_map=None,
    )
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # 4.57: the ignore lists and old rotary buffers, applied apart
        missing, unexpected = adjust(missing, unexpected, task_from_base)
    mismatched, _ = hf._find_mismatched_keys(model, state, None, True, renaming, False, True)
    params = dict(model.named_parameters(remove_duplicate=False))
    _refuse_keys(
        unexpected=sorted(unexpected),
        missing=sorted(k for k in missing if k in params),
        mismatched=sorted(mismatched),
    )
    target = model
    if task_from_base:  # a base model's checkpoint into a model with a head: loaded into its base
        target = getattr(model, prefix)
        renaming = {k: v[len(prefix) + 1 :] for k, v in renaming.items()}
    expected = set(target.state_dict())
    reverse = {v: k for k, v in renaming.items()}
    device_map = {"": next(model.parameters()).device}
    for key, name in renaming.items():
        if name not in expected:  # unexpected keys from_pretrained lets pass: never materialised
            continue
        value = state[key]
        tensor = value if isinstance(value, torch.Tensor) else value[...]
        _call(
            hf._load_state_dict_into_meta_model,
            model=target,
            state_dict={name: tensor},
            shard_file="",
            expected_keys=expected,
            reverse_renaming_mapping=reverse,
            device_map=device_map,
        )
        del tensor  # one tensor at a time
    model.tie_weights()


def _call(f, **kwargs):
    """``f`` with those of ``kwargs`` its signature names."""
    import inspect

    names = inspect.signature(f).parameters
    return f(**{k: v for k, v in kwargs.items() if k in names})


def _refuse_keys(*, unexpected=(), missing=(), mismatched=(), errors=()) -> None:
    for keys, what in (
        (unexpected, "checkpoint tensors the model does not have"),
        (missing, "model tensors missing from the checkpoints"),
        (mismatched, "checkpoint tensors of another shape than the model's"),
        (errors, "checkpoint tensors transformers cannot convert"),
    ):
        if keys:
            raise ValueError(f"{what}: {list(keys)[:3]}")


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


def seq_len_of(model, seq_len: int | None = None) -> int:
    """Tokens per evaluation block: ``seq_len`` if given, else the model's maximum positions, else
    ``DEFAULT_SEQ_LEN`` (the one default of ``extramerge eval`` and the study)."""
    return seq_len or max_positions(model) or DEFAULT_SEQ_LEN


class _NotPadded(logging.Filter):
    """Evaluation and training feed packed text, never padded: transformers' warning that input_ids 'may be
    padded' (EOS is also the pad token, and a block may start or end with it) does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "may be padded" not in record.getMessage()


@contextlib.contextmanager
def packed_inputs():
    """Within: transformers' attention-mask warning, which is about padded inputs, is not printed."""
    log, only = logging.getLogger("transformers.modeling_utils"), _NotPadded()
    log.addFilter(only)
    try:
        yield
    finally:
        log.removeFilter(only)


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


def autocast(device, dtype: str = "auto"):
    """Autocast to bf16 (matmuls in bf16, reductions and the loss in float32): on CUDA by default
    (``"auto"``), on any device with ``"bf16"``; none with ``"fp32"``."""
    import torch

    device = torch.device(device)
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
