"""Checkpoints in any format the merge engine reads, evaluated as ``extramerge study`` evaluates them
(``extramerge eval CKPT... --config DIR | --model-factory MODULE:FN [--tokenizer DIR]``).

A nanoGPT ``.pt`` file, a DCP or Megatron folder or a bare safetensors file says nothing of the model, so
:mod:`extramerge.study.models` builds one, once: ``AutoModelForCausalLM.from_config`` of an HF config
folder, or the user's factory called with the last checkpoint as the merge engine opened it. Each
checkpoint's tensors are then put into that model: through transformers' own loader with a config
(:func:`.model.load_weights`), strictly by the checkpoints' own names, one tensor at a time, with a factory
(``study.models.load_state``). The tokenizer is ``--tokenizer`` or the checkpoints' own
(``study.inputs.tokenizer_of``). Bad input is a ValueError of one line naming the flag or the file."""

from __future__ import annotations

from pathlib import Path

from ..io import load_checkpoints, safety
from ..study.inputs import StudyError, tokenizer_of
from ..study.models import ModelSource, build_model, context_length, factory_forward, load_state
from .model import load_tokenizer, load_weights, max_positions, tokenizer_files, tokenizer_folder

__all__ = ["CheckpointModel"]


class CheckpointModel:
    """One model for checkpoints of one architecture. ``entries``: (display name, path, step) per
    checkpoint, in order; ``load(i)`` puts checkpoint i's tensors into ``model``; ``tokenizer``;
    ``forward`` (input_ids → logits of every position; None for transformers' models, called as usual);
    ``context`` (a factory's context length, else None: the HF config's maximum applies); ``inputs`` (what
    it reads, never to be written over). Everything is checked on construction: the flags, the checkpoints
    (same tensor names and shapes), the tokenizer, the model built, the first checkpoint loaded into it and
    one forward of two tokens; ``close()`` releases the checkpoints."""

    def __init__(self, paths, source: ModelSource, tokenizer: str | None, *, device, seq_len: int | None):
        source.check()
        self.source = source
        self.ckpts, self.entries = _open(paths)
        self.loaded: int | None = None
        try:
            _same_tensors(self.ckpts)
            tok = tokenizer_of(self.ckpts, tokenizer)
            self.tokenizer_folder = tokenizer_folder(tok) or tok
            self.tokenizer = load_tokenizer(self.tokenizer_folder)
            self.model = build_model(self.ckpts[-1], source, device=device)
            self.forward = None if source.hf else factory_forward(self.model, source.factory)
            self.context = None if source.hf else context_length(self.model)
            limit = self.context or max_positions(self.model)
            if seq_len is not None and limit is not None and seq_len > limit:
                raise ValueError(f"--seq-len {seq_len}: longer than the model's {limit} positions")
            self.load(0)
            self._probe()
        except BaseException:
            self.close()
            raise
        self.inputs = [c.path for c in self.ckpts] + tokenizer_files(self.tokenizer_folder)

    def load(self, i: int) -> None:
        """Checkpoint i's tensors into the model (a no-op when they are there already)."""
        if self.loaded == i:
            return
        c = self.ckpts[i]
        self.loaded = None
        if self.source.hf:
            try:
                load_weights(self.model, {name: c.read(name) for name in c.infos})
            except ValueError as e:
                raise StudyError(f"{c.path}: {e}") from None
        else:
            load_state(self.model, {name: _Read(c, name) for name in c.infos}, c.aliases, c.path)
        self.loaded = i

    def _probe(self) -> None:
        """One forward of two tokens: a factory's model that fails or gives no per-position logits is one
        line now, before any evaluation."""
        import torch

        if self.forward is None:
            return
        device = next(self.model.parameters()).device
        ids = torch.zeros(1, min(2, self.context), dtype=torch.long, device=device)
        try:
            with torch.inference_mode():
                self.forward(ids)
        except StudyError:
            raise
        except Exception as e:
            what = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise StudyError(
                f"--model-factory {self.source.factory}: the model's forward failed ({type(e).__name__}: "
                f"{what})"
            ) from None

    def close(self) -> None:
        for c in self.ckpts:
            c.close()


class _Read:
    """One tensor of a checkpoint, read when ``load_state`` materialises it (``v[...]``)."""

    def __init__(self, ckpt, name: str):
        self.ckpt, self.name = ckpt, name

    def __getitem__(self, key):
        return self.ckpt.read(self.name)[key]


def _open(paths) -> tuple[list, list[tuple[str, Path, int | None]]]:
    """The checkpoints, each path through the merge engine's reader (a folder of checkpoints expands to
    them, oldest first), and a display name per checkpoint: the path given, or ``folder/child``."""
    ckpts: list = []
    entries = []
    try:
        for p in paths:
            opened = load_checkpoints([p])
            ckpts.extend(opened)
            whole = len(opened) == 1 and Path(opened[0].path) == Path(p)
            for c in opened:
                name = str(p) if whole else f"{Path(p).name}/{Path(c.path).name}"
                entries.append((name, Path(c.path), c.step))
        safety.distinct(c.path for c in ckpts)
    except BaseException:
        for c in ckpts:
            c.close()
        raise
    return ckpts, entries


def _same_tensors(ckpts) -> None:
    """Every checkpoint holds the tensors of the last one (names and shapes; one model evaluates them all)."""
    ref = ckpts[-1]
    want = {n: tuple(i.shape) for n, i in ref.infos.items()}
    for c in ckpts[:-1]:
        have = {n: tuple(i.shape) for n, i in c.infos.items()}
        if have == want:
            continue
        name = sorted(set(have) ^ set(want)) or sorted(n for n in want if have[n] != want[n])
        shown = safety.shown(name[0])
        raise StudyError(
            f"{c.path} and {ref.path}: tensor {shown} differs (one model evaluates them all: give "
            "checkpoints of one architecture)"
        )
