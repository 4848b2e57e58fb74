"""The model the study loads each merge into: built from the newest checkpoint's own folder (the default:
an HF folder, through ``from_pretrained``), from an HF config folder (``--config DIR``: checkpoints in
other formats whose tensors carry HF names, e.g. a DCP save of an HF model's state dict), or by a factory
the user names (``--model-factory module:function``, see :mod:`.factories`).

With a config folder, merges load through transformers' own loader (``extramerge.eval.load_weights``)
as from an HF folder; with a factory, by the checkpoints' own tensor names, strictly."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from .inputs import StudyError

__all__ = [
    "ModelSource",
    "build_model",
    "load_state",
    "logits_of",
    "factory_forward",
    "context_length",
    "model_dims",
]

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_LENGTHS = ("n_positions", "max_position_embeddings", "n_ctx", "block_size", "max_seq_len")


@dataclass(frozen=True)
class ModelSource:
    """Where the study's model comes from: ``config`` (an HF config folder) or ``factory``
    (``module:function``), at most one; neither: the newest checkpoint's own HF folder."""

    config: str | None = None
    factory: str | None = None

    @property
    def given(self) -> bool:
        return self.config is not None or self.factory is not None

    @property
    def hf(self) -> bool:
        """Merges load through transformers' loader (an HF folder or config), not by strict names."""
        return self.factory is None

    def check(self) -> None:
        """The flags, checked before anything is read or written: one line naming the flag."""
        if self.config is not None and self.factory is not None:
            raise StudyError("--model-factory and --config: give one (the factory builds its own model)")
        if self.config is not None:
            _config_json(self.config)
        if self.factory is not None:
            resolve_factory(self.factory)


def _config_json(folder: str) -> Path:
    from ..io import safety

    p = Path(folder)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise StudyError(f"--config {folder}: not a folder with config.json")
    try:
        cfg = safety.load_json(p / "config.json", root=p)
    except (ValueError, OSError) as e:
        raise StudyError(f"--config {folder}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise StudyError(f"--config {folder}: config.json states no model_type")
    return p


def resolve_factory(spec: str):
    """``module:function`` imported (code the user named on the command line, never a name a checkpoint
    holds) → the callable."""
    if not _SPEC.match(spec):
        raise StudyError(
            f"--model-factory {spec}: expected module:function (e.g. extramerge.study.factories:nanogpt)"
        )
    mod, _, fn = spec.partition(":")
    try:
        module = importlib.import_module(mod)
    except Exception as e:
        raise StudyError(
            f"--model-factory {spec}: cannot import {mod} ({type(e).__name__}: {_first_line(e)})"
        ) from None
    f = getattr(module, fn, None)
    if not callable(f):
        raise StudyError(f"--model-factory {spec}: {mod} has no function {fn}")
    return f


def build_model(ckpt, source: ModelSource, *, device, root=None):
    """The float32 model on ``device``, in eval mode; StudyError naming the flag or folder at fault."""
    import torch

    if source.factory is not None:
        try:
            model = resolve_factory(source.factory)(ckpt)
        except StudyError:
            raise
        except Exception as e:
            raise StudyError(
                f"--model-factory {source.factory}: failed ({type(e).__name__}: {_first_line(e)})"
            ) from None
        if not isinstance(model, torch.nn.Module):
            raise StudyError(
                f"--model-factory {source.factory}: returned a {type(model).__name__}, not a torch.nn.Module"
            )
        if context_length(model) is None:
            raise StudyError(
                f"--model-factory {source.factory}: the model states no context length (give it a config "
                f"or attribute {', '.join(_LENGTHS)})"
            )
        model = model.float()
    elif source.config is not None:
        model = _from_config(source.config)
    else:
        from ..eval import load_model

        try:
            model, _ = load_model(ckpt.path, device=device, dtype=torch.float32, root=root)
        except ValueError as e:
            raise StudyError(str(e)) from None
    model.to(device)
    model.eval()
    return model


def _from_config(folder: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = _config_json(folder)
    try:
        cfg = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=False)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=False)
    except Exception as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StudyError(
            f"--config {folder}: cannot build a causal LM ({type(e).__name__}: {what})"
        ) from None


def model_dims(ckpt, source: ModelSource) -> dict:
    """The sizes the memory plan needs before any model is built — ``seq_len`` (evaluation block),
    ``vocab`` and ``hidden`` — from the HF config (``--config`` or the newest checkpoint's folder); {}
    with a factory or where the config does not say."""
    from ..eval import DEFAULT_SEQ_LEN
    from ..io import safety

    if source.factory is not None:
        return {}
    folder = Path(source.config) if source.config is not None else Path(ckpt.path)
    if not folder.is_dir():
        return {}
    try:
        cfg = safety.load_json(folder / "config.json", root=folder)
    except (ValueError, OSError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg

    def first(*keys):
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    return {
        "seq_len": first("n_positions", "max_position_embeddings", "n_ctx") or DEFAULT_SEQ_LEN,
        "vocab": first("vocab_size"),
        "hidden": first("n_embd", "hidden_size", "d_model"),
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def context_length(model) -> int | None:
    """The longest sequence a factory's model takes: its ``config``, ``model_args`` or the module itself
    stating one of ``_LENGTHS``."""
    for holder in (getattr(model, "config", None), getattr(model, "model_args", None), model):
        for attr in _LENGTHS:
            v = holder.get(attr) if isinstance(holder, dict) else getattr(holder, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def load_state(model, state: dict, aliases: dict, where) -> None:
    """A factory's model: every parameter and persistent buffer set from ``state`` by name (a lazy value is
    materialised with ``v[...]``, one tensor at a time); ``aliases`` (a checkpoint's tied duplicate → its
    stored name) and parameters tied in the model count as given. StudyError naming what does not fit."""
    import torch

    targets = model.state_dict(keep_vars=True)
    given = dict(state)
    given.update({a: state[c] for a, c in aliases.items() if c in state and a not in state})
    unexpected = sorted(set(given) - set(targets))
    covered = {id(targets[k]) for k in given if k in targets}
    missing = sorted(k for k, t in targets.items() if k not in given and id(t) not in covered)
    for keys, what in (
        (unexpected, "checkpoint tensors the model does not have"),
        (missing, "model tensors missing from the checkpoints"),
    ):
        if keys:
            raise StudyError(f"{where}: {what}: {keys[:3]}")
    done: set = set()
    with torch.no_grad():
        for name, v in given.items():
            t = targets[name]
            if id(t) in done:
                continue
            value = v if isinstance(v, torch.Tensor) else v[...]
            if tuple(value.shape) != tuple(t.shape):
                raise StudyError(
                    f"{where}: checkpoint tensor {name} has shape {tuple(value.shape)}, the model's "
                    f"{tuple(t.shape)}"
                )
            t.copy_(value)
            done.add(id(t))


def logits_of(out):
    """The logits of a forward: a tensor, the first element of a tuple/list, or ``.logits``."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise StudyError(f"the model's forward returned a {type(out).__name__}, not logits")


def factory_forward(model, factory: str):
    """A factory's model as a function input_ids [B, T] → the logits of every position [B, T, vocab]
    (``module(input_ids)`` through :func:`logits_of`); StudyError naming ``factory`` when it gives no
    logits or not every position's (nanoGPT's own forward gives the last position's only)."""

    def forward(ids):
        try:
            logits = logits_of(model(ids))
        except StudyError as e:
            raise StudyError(f"--model-factory {factory}: {e}") from None
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise StudyError(
                f"--model-factory {factory}: the model's logits have shape {tuple(logits.shape)}, not "
                f"[batch, {ids.shape[1]}, vocab] (the logits of every position)"
            )
        return logits

    return forward
