"""Evaluate any weight vector over a set of checkpoints as a causal LM, with the NLL of every document.

The checkpoints' floating-point tensors are held stacked [N, ...] in float32 (refused up front when they
cannot fit in memory); a merge wᵀθ is built tensor by tensor in float64 (long extrapolations cancel a lot)
and loaded into one model. Losses follow ``extramerge.eval.loss``'s convention (one packed stream per half,
every token predicted once); the NLL is also summed per document, for standard errors clustered by document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .inputs import StudyError

__all__ = ["Evaluator", "DocLosses", "paired_delta"]


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


def _check_memory(ckpts, names) -> None:
    from rivervalley.common.resources import require_memory

    infos = ckpts[-1].infos
    sizes = [infos[n].numel for n in names if n in infos and infos[n].dtype_str.startswith(("F", "BF"))]
    n = len(ckpts)
    need = 4 * (n + 2) * sum(sizes) + 8 * (n + 1) * max(sizes, default=0)
    require_memory(need, f"the study of {n} checkpoints x {sum(sizes) / 1e6:.3g}M parameters (float32)")


class Evaluator:
    """Holds every checkpoint's float tensors and one model; ``measure(w, half)`` gives its DocLosses."""

    def __init__(self, ckpts, names, tokenizer_path, *, device="cpu", batch_size=16, digests=False):
        import torch

        from ..eval import load_model
        from .hub import snapshot_root

        self.torch = torch
        self.device = device
        self.path = ckpts[-1].path
        self.batch_size = batch_size
        try:
            root = snapshot_root(ckpts[-1].path)  # a hub cache snapshot links into its repository's blobs/
            self.model, _ = load_model(ckpts[-1].path, device=device, dtype=torch.float32, root=root)
        except ValueError as e:
            raise StudyError(str(e)) from None
        self.tokenizer = _load_tokenizer(tokenizer_path)
        self.stacks: dict = {}  # by the checkpoints' own tensor names: transformers maps them to the model's
        self.fixed: dict = {}
        if not str(device).startswith("cuda"):
            _check_memory(ckpts, names)
        hashes = [hashlib.sha256() for _ in ckpts] if digests else []
        for name in sorted(names):
            tensors = [c.read(name) for c in ckpts]
            for h, t in zip(hashes, tensors, strict=False):  # no hashes without digests
                _digest(h, name, t)
            if tensors[-1].is_floating_point():
                self.stacks[name] = torch.stack([t.to(torch.float32) for t in tensors]).to(device)
            else:  # integer/bool buffers: the newest checkpoint's, as the merge engine does
                self.fixed[name] = tensors[-1].clone().to(device)
        self.digests = [h.hexdigest() for h in hashes]  # of each checkpoint's tensors, as read
        self.halves: dict = {}
        self.calls = 0
        self._memo: dict = {}  # (weights bytes, half) -> DocLosses: a merge evaluated twice is read back

    def add_half(self, name: str, docs: list[str]) -> None:
        from ..eval import document_index, seq_len_of, token_blocks

        L = seq_len_of(self.model)
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
        wt = torch.as_tensor(np.asarray(w, dtype=np.float64), dtype=torch.float64, device=self.device)
        state = {}
        for name, st in self.stacks.items():
            flat = st.reshape(st.shape[0], -1)
            state[name] = (wt @ flat.to(torch.float64)).to(torch.float32).reshape(st.shape[1:])
        state.update(self.fixed)
        try:
            load_weights(self.model, state)
        except ValueError as e:
            raise StudyError(f"{self.path}: {e}") from None

    def measure(self, w, half: str) -> DocLosses:
        """Per-document NLL of the merge wᵀθ on one half (each distinct merge evaluated once per half)."""
        key = (np.asarray(w, dtype=np.float64).tobytes(), half)
        if key not in self._memo:
            self._memo[key] = self._measure(w, half)
        return self._memo[key]

    def _measure(self, w, half: str) -> DocLosses:
        import torch.nn.functional as F

        from ..eval import PAD, packed_inputs

        torch = self.torch
        self.load(w)
        blocks, doc_idx, n_docs = self.halves[half]
        ids = blocks.ids
        nll = torch.zeros(n_docs + 1, dtype=torch.float64)
        cnt = torch.zeros(n_docs + 1, dtype=torch.float64)
        self.model.eval()
        with torch.inference_mode(), packed_inputs():
            for i in range(0, ids.shape[0], self.batch_size):
                b = ids[i : i + self.batch_size].to(self.device)
                labels = b[:, 1:]
                logits = self.model(input_ids=b[:, :-1].clamp_min(0), use_cache=False).logits
                tok = (
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(),
                        labels.reshape(-1),
                        ignore_index=PAD,
                        reduction="none",
                    )
                    .to(torch.float64)
                    .cpu()
                )
                di = doc_idx[i : i + self.batch_size].reshape(-1)
                slot = torch.where(di >= 0, di, n_docs)
                nll.index_add_(0, slot, tok)
                cnt.index_add_(0, slot, (di >= 0).to(torch.float64))
        self.calls += 1
        out = DocLosses(nll[:n_docs].numpy(), cnt[:n_docs].numpy())
        if not np.isfinite(out.nll).all():
            raise StudyError(
                "a merge's loss is not finite (its weights overflow the model): shrink the α grid"
            )
        return out


def _digest(h, name: str, t) -> None:
    """Add one tensor (name, dtype, shape, bytes) to a checkpoint's SHA-256."""
    import torch

    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    from ..eval import tokenizer_files

    files = tokenizer_files(path)
    folder = files[0].parent if files else path
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise StudyError(f"{path}: cannot load the tokenizer ({type(e).__name__})") from None
