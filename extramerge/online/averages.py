"""The stores the online merges read, over lists of tensors (a model's parameters or their local shards):

- ``Ring``: the last C snapshots (slot copies; the oldest slot is overwritten), each with its step;
- ``RunningEMA``: an EMA updated in place by ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (the very
  update AveragedModel runs, so the two agree bit for bit; the first update copies), with a constant β or
  the power profile β_t = (1 − 1/t)^(γ+1) of Karras et al. (EDM2), and optionally a ring of its own past
  values for Extra-Merge.

Each merge is a list of (coefficient, tensors) terms over these stores; ``combine_into`` writes Σ c_j X_j
into a list of tensors, accumulating in float32 (float64 for float64 tensors) one tensor at a time.

Stores may live on another device than the tensors they follow (``device="cpu"`` for CUDA parameters):
slots are then pinned and filled with non-blocking copies, and an EMA stages the parameters through a pinned
buffer and runs its update at the next call (or read), so the host work overlaps the GPU's next step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = [
    "Ring",
    "RunningEMA",
    "power_beta",
    "combine_into",
    "allocate",
    "nbytes",
    "local_tensor",
    "DTensor",
]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

Tensors = list[torch.Tensor]


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds of ``p``: its local shard for a DTensor, else ``p``; detached, sharing
    storage with ``p`` (writing into it writes the parameter)."""
    if DTensor is not None and isinstance(p, DTensor):
        p = p.to_local()
    return p.detach()


def allocate(like: Sequence[torch.Tensor], device=None, dtype=None) -> Tensors:
    """Empty tensors shaped like ``like`` on ``device`` (None: each one's own) in ``dtype`` (None: its own);
    pinned when they live on the CPU for CUDA tensors, so that copies into them can be non-blocking."""
    out = []
    for t in like:
        dev = torch.device(device) if device is not None else t.device
        pin = dev.type == "cpu" and t.device.type == "cuda"
        out.append(torch.empty(t.shape, dtype=dtype or t.dtype, device=dev, pin_memory=pin))
    return out


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copy(dst: Tensors, src: Sequence[torch.Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s, non_blocking=d.is_pinned() or s.is_pinned())


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices grouped by (device, dtype): one foreach update per group, as AveragedModel does."""
    out: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return list(out.values())


class _Pending:
    """The completion of non-blocking device-to-host copies (a CUDA event; nothing to wait for on CPU)."""

    def __init__(self, src: Sequence[torch.Tensor]):
        cuda = next((t.device for t in src if t.device.type == "cuda"), None)
        self.event = torch.cuda.Event() if cuda is not None else None
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(cuda))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Ring:
    """The last ``capacity`` snapshots, oldest first; ``steps`` are their training steps."""

    def __init__(self, like: Sequence[torch.Tensor], capacity: int, device=None, dtype=None):
        self.capacity = int(capacity)
        self.slots = [allocate(like, device, dtype) for _ in range(self.capacity)]
        self.steps: list[int] = []
        self.head = 0  # the slot the next snapshot goes to
        self.pending: _Pending | None = None

    def push(self, src: Sequence[torch.Tensor], step: int) -> None:
        _copy(self.slots[self.head], src)
        self.pending = _Pending(src)
        self.head = (self.head + 1) % self.capacity
        self.steps = [*self.steps, step][-self.capacity :]

    @property
    def count(self) -> int:
        return len(self.steps)

    def latest(self, n: int) -> list[Tensors]:
        """The last ``n`` snapshots, oldest first (waits for copies still in flight)."""
        if n > self.count:
            raise ValueError(f"the ring holds {self.count} snapshots, {n} asked")
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        return [self.slots[(self.head - n + j) % self.capacity] for j in range(n)]

    def nbytes(self) -> int:
        return sum(nbytes(s) for s in self.slots)

    def state_dict(self) -> dict:
        n = self.count
        return {"steps": list(self.steps), "slots": [[t.cpu() for t in s] for s in self.latest(n)]}

    def load_state_dict(self, state: dict) -> None:
        slots = state["slots"][-self.capacity :]
        for j, s in enumerate(slots):
            _copy(self.slots[j], s)
        self.steps = list(state["steps"])[-self.capacity :]
        self.head = len(slots) % self.capacity


def power_beta(t: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1): the power-function EMA of EDM2 at its t-th update (β_1 = 0: a copy)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class RunningEMA:
    """m_t = β m_{t−1} + (1 − β) θ_t (m_1 = θ_1), with β constant (``decay``) or β_t = (1 − 1/t)^(γ+1)
    (``gamma``); ``history`` > 0 keeps the last values m_{t−1}..m_{t−history} for Extra-Merge."""

    def __init__(self, like, *, decay=None, gamma=None, history=0, device=None, dtype=None):
        if (decay is None) == (gamma is None):
            raise ValueError("RunningEMA needs exactly one of decay and gamma")
        self.decay, self.gamma = decay, gamma
        self.value = allocate(like, device, dtype)
        self.groups = _groups(self.value)
        self.t = 0  # updates so far
        self.step = None
        self.past = Ring(like, history, device, dtype) if history else None
        staged = any(v.device != t.device for v, t in zip(self.value, like, strict=True))
        self.stage = allocate(like, device, None) if staged else None
        self.pending: _Pending | None = None
        self.step_pending = 0

    def beta(self, t: int) -> float:
        return self.decay if self.gamma is None else power_beta(t, self.gamma)

    def update(self, src: Sequence[torch.Tensor], step: int) -> None:
        self.flush()
        if self.stage is None:
            self._apply(list(src), step)
        else:  # off-device: copy now, average at the next call or read (the host overlaps the GPU)
            _copy(self.stage, src)
            self.pending = _Pending(src)
            self.step_pending = step

    def flush(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            self._apply(self.stage, self.step_pending)

    def _apply(self, src: Tensors, step: int) -> None:
        self.t += 1
        if self.t == 1:
            _copy(self.value, src)
        else:
            if self.past is not None:
                self.past.push(self.value, self.step)
            fn = get_ema_multi_avg_fn(self.beta(self.t))
            for idx in self.groups:
                vals, srcs = [self.value[i] for i in idx], [src[i] for i in idx]
                if all(v.dtype == s.dtype and v.device == s.device for v, s in zip(vals, srcs, strict=True)):
                    fn(vals, srcs, None)
                else:  # another dtype or device: cast one tensor at a time (no full-model temporary)
                    for v, s in zip(vals, srcs, strict=True):
                        fn([v], [s.to(v.device, v.dtype)], None)
        self.step = step

    def current(self) -> Tensors:
        self.flush()
        return self.value

    def before(self, d: int) -> Tensors:
        """m_{t−d} (needs history >= d and t > d)."""
        self.flush()
        return self.past.latest(d)[0]

    def nbytes(self) -> int:
        extra = (self.past.nbytes() if self.past else 0) + (nbytes(self.stage) if self.stage else 0)
        return nbytes(self.value) + extra

    def state_dict(self) -> dict:
        self.flush()
        return {
            "t": self.t,
            "step": self.step,
            "value": [v.cpu() for v in self.value],
            "past": self.past.state_dict() if self.past is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.t, self.step = int(state["t"]), state["step"]
        _copy(self.value, state["value"])
        if self.past is not None and state["past"] is not None:
            self.past.load_state_dict(state["past"])


@torch.no_grad()
def combine_into(dst: Sequence[torch.Tensor], terms: Sequence[tuple[float, Sequence[torch.Tensor]]]) -> None:
    """dst_i = Σ_j c_j X_j[i] for every tensor i; a single term of coefficient 1 is an exact copy."""
    if len(terms) == 1 and terms[0][0] == 1.0:
        _copy(list(dst), terms[0][1])
        return
    for i, d in enumerate(dst):
        first = terms[0][1][i]
        acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
        for c, xs in terms:
            acc.add_(xs[i], alpha=float(c))
        d.copy_(acc)
