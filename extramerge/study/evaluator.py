"""Evaluate any weight vector over a set of checkpoints as a causal LM, with the NLL of every document.

The checkpoints' floating-point tensors are held stacked [N, ...] in float32 where that fits in half the
memory available, else streamed: each merge is built from the checkpoint files tensor by tensor, in chunks,
as transformers' loader sets each parameter, so memory holds the model and one tensor (:func:`plan`). Either
way a merge wᵀθ is accumulated in float64 on CPU (long extrapolations cancel a lot) and loaded into one
model through transformers' own loader. Losses follow ``extramerge.eval.loss``'s convention (one packed
stream per half, every token predicted once); the NLL is also summed per document, for standard errors
clustered by document.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from .inputs import StudyError
from .models import (
    ModelSource,
    build_model,
    context_length,
    factory_forward,
    load_state,
    model_dims,
)

__all__ = ["Evaluator", "DocLosses", "paired_delta", "plan"]


@dataclass(frozen=True)
class DocLosses:
    """NLL (nats) and scored tokens of each document of one half, for one merge."""

    nll: np.ndarray
    tokens: np.ndarray

    @property
    def loss(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())


def paired_delta(a: DocLosses, base: DocLosses) -> tuple[float, float]:
    """ΔL = loss(a) − loss(base) on the same documents, and its standard error clustered by document
    (the ratio estimator's linearisation: Var = D/(D−1) Σ_k (d_k − ΔL·n_k)² / (Σ n_k)²)."""
    d = a.nll - base.nll
    n = base.tokens
    delta = float(d.sum() / n.sum())
    D = d.size
    if D < 2:
        return delta, float("nan")
    r = d - delta * n
    return delta, float(np.sqrt(D / (D - 1) * (r @ r)) / n.sum())


CHUNK = 1 << 20  # elements per read when streaming (8 MiB of float64 accumulator)
LOGITS_BUDGET = 128 << 20  # bytes of logits per forward (cross-entropy takes as much again)


def plan(ckpts, names, device="cpu", stream=None, dims=None) -> dict:
    """How the study holds its checkpoints and the memory that needs: ``stacked`` (every checkpoint's float
    tensors in float32, summed in float64 one checkpoint at a time) when that fits in half the memory
    available now, else ``streamed`` (each merge built tensor by tensor from the checkpoint files, straight
    into the model's parameters). ``stream`` True/False forces it. On CUDA the stacks live on the device,
    so host memory is planned as streamed.

    Counted: the model in float32, the stacks (stacked) or one reusable read buffer and accumulator
    (streamed), one forward's logits (``LOGITS_BUDGET``, or one block's where that is more) and the
    cross-entropy's chunks, an estimate of the forward's activations (16 floats per position and hidden
    unit, from ``dims``: ``models.model_dims``), and this process as it stands (the interpreter, torch).
    Not counted: allocator slack, and tensors a factory's model holds besides its parameters."""
    from rivervalley.common.resources import available_memory

    from ..eval.loss import NLL_CHUNK_BYTES

    infos = ckpts[-1].infos
    sizes = [infos[n].numel for n in names if n in infos and infos[n].dtype_str.startswith(("F", "BF"))]
    n, big = len(ckpts), max(sizes, default=0)
    dims = dims or {}
    length, vocab, hidden = dims.get("seq_len"), dims.get("vocab"), dims.get("hidden")
    one_block = 4 * length * vocab if length and vocab else 0
    forward = max(LOGITS_BUDGET, one_block) + 2 * NLL_CHUNK_BYTES
    if length and hidden:
        rows = max(1, LOGITS_BUDGET // one_block) if one_block else 1
        forward += 16 * 4 * rows * length * hidden
    process = _resident_bytes()
    stacked = process + 4 * (n + 2) * sum(sizes) + 12 * big + forward
    streamed = process + 4 * sum(sizes) + 16 * min(CHUNK, big) + forward
    have = available_memory()
    if stream is None:
        stream = str(device).startswith("cuda") or (have is not None and stacked - process > have // 2)
    return {
        "mode": "streamed" if stream else "stacked",
        "bytes": streamed if stream else stacked,
        "stacked_bytes": stacked,
        "streamed_bytes": streamed,
        "process_bytes": process,
        "available_bytes": have,
        "checkpoints": n,
        "parameters": sum(sizes),
    }


def _resident_bytes() -> int:
    """This process's resident memory now (0 where /proc does not say)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _check_memory(p: dict) -> None:
    from rivervalley.common.resources import require_memory

    hint = " (float32)" if p["mode"] == "stacked" else ", streamed"
    require_memory(
        p["bytes"] - p["process_bytes"],  # what is resident already is not asked of the kernel again
        f"the study of {p['checkpoints']} checkpoints x {p['parameters'] / 1e6:.3g}M parameters{hint}",
    )


class Evaluator:
    """One model and the checkpoints' float tensors, stacked in memory or streamed from their files
    (:func:`plan`); ``measure(w, half)`` gives the merge wᵀθ's DocLosses."""

    def __init__(
        self,
        ckpts,
        names,
        tokenizer_path,
        *,
        device="cpu",
        batch_size=16,
        digests=False,
        stream=None,
        model: ModelSource | None = None,
        dtype: str = "fp32",
    ):
        import torch

        from rivervalley.common.resources import return_large_frees

        from ..eval import seq_len_of
        from .hub import snapshot_root

        self.torch = torch
        self.device = device
        self.dtype = dtype  # "fp32", or "bf16": forwards under bf16 autocast (the loss in float32)
        self.path = ckpts[-1].path
        self.batch_size = batch_size
        self.source = model or ModelSource()
        self.plan = plan(ckpts, names, device, stream, model_dims(ckpts[-1], self.source))
        if not str(device).startswith("cuda"):
            _check_memory(self.plan)
        if self.plan["mode"] == "streamed":
            return_large_frees()  # each forward's freed logits and activations go back to the kernel
        root = snapshot_root(ckpts[-1].path)  # a hub cache snapshot links into its repository's blobs/
        self.model = build_model(ckpts[-1], self.source, device=device, root=root)
        self.seq_len = seq_len_of(self.model) if self.source.hf else context_length(self.model)
        self._forward = None if self.source.hf else factory_forward(self.model, self.source.factory)
        self.aliases = dict(ckpts[-1].aliases)  # a factory's model: tied duplicates the file left out
        self.tokenizer = _load_tokenizer(tokenizer_path)
        self.streamed = self.plan["mode"] == "streamed"
        self.ckpts = ckpts
        self.stacks: dict = {}  # by the checkpoints' own tensor names: transformers maps them to the model's
        self.floats: dict = {}  # streamed: name -> (shape, numel)
        self.fixed: dict = {}
        hashes = [hashlib.sha256() for _ in ckpts] if digests else []
        infos = ckpts[-1].infos
        for name in sorted(names):
            if self.streamed:  # one tensor of one checkpoint in memory at a time
                for h, c in zip(hashes, ckpts, strict=False):  # no hashes without digests
                    _digest(h, name, c.read(name))
                if infos[name].dtype_str.startswith(("F", "BF")):
                    self.floats[name] = (tuple(infos[name].shape), int(infos[name].numel))
                else:  # integer/bool buffers: the newest checkpoint's, as the merge engine does
                    self.fixed[name] = ckpts[-1].read(name).clone().to(device)
                continue
            tensors = [c.read(name) for c in ckpts]
            for h, t in zip(hashes, tensors, strict=False):
                _digest(h, name, t)
            if tensors[-1].is_floating_point():
                self.stacks[name] = torch.stack([t.to(torch.float32) for t in tensors]).to(device)
            else:
                self.fixed[name] = tensors[-1].clone().to(device)
        self.digests = [h.hexdigest() for h in hashes]  # of each checkpoint's tensors, as read
        self.targets: dict = {}  # streamed: checkpoint name -> the parameter that takes it as it is
        self._learned = False
        self._buf = None
        self._acc = None
        self.halves: dict = {}
        self.calls = 0
        self.timing = {"build_seconds": 0.0, "forward_seconds": 0.0, "tokens": 0}
        self._memo: dict = {}  # (weights bytes, half) -> DocLosses: a merge evaluated twice is read back

    def add_half(self, name: str, docs: list[str]) -> None:
        from ..eval import document_index, token_blocks

        L = self.seq_len
        self.halves[name] = (
            token_blocks(docs, self.tokenizer, L),
            document_index(docs, self.tokenizer, L),
            len(docs),
        )

    def tokens(self, half: str) -> int:
        return int(self.halves[half][0].n_tokens)

    def doc_tokens(self, half: str) -> list[int]:
        """Scored tokens of each document of a half."""
        _, doc_idx, n_docs = self.halves[half]
        idx = doc_idx[doc_idx >= 0]
        return [int(x) for x in np.bincount(idx.numpy(), minlength=n_docs)]

    def load(self, w) -> None:
        """Load the merge wᵀθ into the model as ``from_pretrained`` would load it from a folder."""
        from ..eval import load_weights

        torch = self.torch
        state = {}
        if self.streamed:
            for name, (shape, numel) in self.floats.items():
                state[name] = _Merged(self, name, shape, numel, np.asarray(w, dtype=np.float64))
            merged = dict(state)
        else:
            for name, st in self.stacks.items():  # Σᵢ wᵢ θᵢ in float64, one checkpoint at a time
                acc = torch.zeros(st.shape[1:], dtype=torch.float64, device=self.device)
                for x, wi in zip(st, np.asarray(w, dtype=np.float64), strict=True):
                    if wi != 0:
                        acc.add_(x, alpha=float(wi))  # promoted to float64 in place, as streamed
                state[name] = acc.to(torch.float32)
        state.update(self.fixed)
        if not self.source.hf:  # a factory's model: by the checkpoints' names, one tensor at a time
            return load_state(self.model, state, self.aliases, self.path)
        try:
            with _one_tensor_at_a_time():
                load_weights(self.model, state)
        except ValueError as e:
            raise StudyError(f"{self.path}: {e}") from None
        if self.streamed and not self._learned:  # the parameters that took a merged tensor as it was built
            ptrs = {m.ptr: name for name, m in merged.items() if m.ptr is not None}
            for p in self.model.parameters():
                if p.data_ptr() in ptrs:
                    self.targets[ptrs[p.data_ptr()]] = p
            self._learned = True

    def accumulator(self):
        """One reusable chunk accumulator for the streamed merges: float64 on CPU, float32 on the device."""
        if self._acc is None:
            f32 = str(self.device).startswith("cuda")
            dtype = self.torch.float32 if f32 else self.torch.float64
            self._acc = self.torch.empty(CHUNK, dtype=dtype, device=self.device)
        return self._acc

    def read_buffer(self):
        """One reusable buffer for the streamed reads (a chunk of the widest dtype)."""
        if self._buf is None:
            self._buf = self.torch.empty(CHUNK * 8, dtype=self.torch.uint8)
        return self._buf

    def measure(self, w, half: str) -> DocLosses:
        """Per-document NLL of the merge wᵀθ on one half (each distinct merge evaluated once per half)."""
        key = (np.asarray(w, dtype=np.float64).tobytes(), half)
        if key not in self._memo:
            self._memo[key] = self._measure(w, half)
        return self._memo[key]

    def _measure(self, w, half: str) -> DocLosses:
        """Build the merge, then evaluate this rank's share of the half's blocks (all of them in one process;
        under torchrun a contiguous block each, ``distributed.rank_block``) and sum the per-document NLL
        over the ranks: every rank gets the same numbers, equal to one process's up to summation order."""
        from rivervalley.common.resources import trim_heap

        from .. import distributed
        from ..eval import packed_inputs
        from ..eval.loss import token_nll
        from ..eval.model import autocast

        torch = self.torch
        group = distributed.current()
        blocks, doc_idx, n_docs = self.halves[half]
        ids = blocks.ids
        nll = torch.zeros(n_docs + 1, dtype=torch.float64)
        cnt = torch.zeros(n_docs + 1, dtype=torch.float64)
        mine = distributed.rank_block([1] * ids.shape[0], group)
        with distributed.agreed(group):  # a failure on one rank (a read, memory) stops every rank here
            t0 = time.perf_counter()
            self.load(w)
            self._sync()
            t1 = time.perf_counter()
            self.model.eval()
            rows = self._rows(ids.shape[1] - 1)
            with torch.inference_mode(), autocast(self.device, self.dtype), packed_inputs():
                for i in range(mine.start, mine.stop, rows):
                    j = min(i + rows, mine.stop)
                    b = ids[i:j].to(self.device)
                    logits = self._logits(b[:, :-1].clamp_min(0))
                    tok = token_nll(logits, b[:, 1:]).to(torch.float64).cpu()
                    del logits
                    di = doc_idx[i:j].reshape(-1)
                    slot = torch.where(di >= 0, di, n_docs)
                    nll.index_add_(0, slot, tok)
                    cnt.index_add_(0, slot, (di >= 0).to(torch.float64))
            self._sync()
            t2 = time.perf_counter()
            if self.streamed:
                trim_heap()  # the forward's freed fragments: resident memory stays at the model's
        if group is not None:
            group.all_reduce_sum(nll.numpy())
            group.all_reduce_sum(cnt.numpy())
        self.calls += 1
        self.timing["build_seconds"] += t1 - t0
        self.timing["forward_seconds"] += t2 - t1
        self.timing["tokens"] += int(blocks.n_tokens)
        out = DocLosses(nll[:n_docs].numpy(), cnt[:n_docs].numpy())
        if not np.isfinite(out.nll).all():
            raise StudyError(
                "a merge's loss is not finite (its weights overflow the model): shrink the α grid"
            )
        return out

    def _sync(self) -> None:
        """Wait for the device (timings of CUDA work)."""
        if str(self.device).startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def _rows(self, length: int) -> int:
        """Blocks per forward: --batch-size, fewer where their logits (blocks x length x vocabulary floats)
        would pass LOGITS_BUDGET: batched by tokens, so a 50k vocabulary does not need gigabytes."""
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            return self.batch_size
        return max(1, min(self.batch_size, LOGITS_BUDGET // (4 * length * vocab)))

    def _logits(self, ids):
        if self.source.hf:
            return self.model(input_ids=ids, use_cache=False).logits
        return self._forward(ids)


class _Merged:
    """One tensor of a merge, built when transformers' loader materialises it (``t[...]``): Σᵢ wᵢ θᵢ read in
    chunks from each checkpoint's file, accumulated in float64 on CPU (float32 on the device). Once the
    first load has shown which parameter takes this tensor as it is (``Evaluator.targets``), the merge is
    written into that parameter's own storage: the model is never held twice."""

    def __init__(self, ev: Evaluator, name: str, shape, numel: int, w):
        self.ev, self.name, self.shape, self.numel, self.w = ev, name, shape, numel, w
        self.ptr = None

    def __getitem__(self, key):
        torch = self.ev.torch
        dev = self.ev.device
        cuda = str(dev).startswith("cuda")
        t = self.ev.targets.get(self.name)
        if t is not None and t.numel() == self.numel and t.is_contiguous() and t.dtype == torch.float32:
            out = t.detach().view(-1)
        else:
            out = torch.empty(self.numel, dtype=torch.float32, device=dev)
        self.ptr = out.data_ptr()
        acc = self.ev.accumulator()
        buf = self.ev.read_buffer()
        for start in range(0, self.numel, CHUNK):
            stop = min(start + CHUNK, self.numel)
            a = acc[: stop - start].zero_()
            for c, wi in zip(self.ev.ckpts, self.w, strict=True):
                if wi != 0:
                    x = c.read_range(self.name, start, stop, out=buf)
                    a.add_(x.to(dev) if cuda else x, alpha=float(wi))  # promoted to a's dtype in place
            out[start:stop] = a
        return out.reshape(self.shape)[key]


@contextlib.contextmanager
def _one_tensor_at_a_time():
    """transformers 5's loader materialises each tensor just before it is set, instead of all at once in its
    thread pool, while this holds (HF_DEACTIVATE_ASYNC_LOAD): a streamed merge never exists whole. (On 4.x
    ``load_weights`` sets one tensor at a time anyway.)"""
    old = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = old


def _digest(h, name: str, t) -> None:
    """Add one tensor (name, dtype, shape, bytes) to a checkpoint's SHA-256."""
    import torch

    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _load_tokenizer(path):
    from ..eval import tokenizer_files
    from ..eval.model import load_tokenizer

    files = tokenizer_files(path)
    try:
        return load_tokenizer(files[0].parent if files else path, name=path, check=False)
    except ValueError as e:
        raise StudyError(str(e)) from None
