"""``OnlineMerger``: SMA / WMA / EMA / power-EMA / Extra-Merge of a model's parameters, kept during
training every ``every`` steps, swapped into the model for evaluation, saved as checkpoints.

    merger = OnlineMerger(model, "ema:0.999,sma:8,extra:0.5@4", every=10)
    for step in range(1, steps + 1):
        ...; optimizer.step()
        merger.update(step)                  # or merger.step(), which counts the calls itself
    with merger.swapped("extra"):            # the extrapolated weights, for evaluation
        evaluate(model)
    merger.save("ema", "out/ema_final")      # through extramerge.io.write_checkpoint (or DCP for shards)

Every merge is an affine weight vector over the snapshots the merger stored (THEORY.md §d'): the windowed
ones (sma, wma, an sma with its own ``weights``, and Extra-Merge of them) read one ring of the last
max(K + d) snapshots and sum it only when read, so an update is one copy and the result equals
``rivervalley.weights.apply`` of the same snapshots; EMAs update in place (AveragedModel's own update);
Extra-Merge of an EMA keeps that EMA's last d values (d more copies). On FSDP2 / DTensor parameters every
store holds the local shard and each rank updates its own: no communication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from rivervalley import weights as rvw

from .averages import DTensor, Ring, RunningEMA, allocate, combine_into, local_tensor, nbytes
from .spec import WINDOWED, Average, parse_spec, resolve_names

__all__ = ["OnlineMerger", "local_tensor", "named_tensors", "window_weights"]


def named_tensors(params) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an nn.Module's parameters (tied ones once), or of an iterable of tensors or
    of (name, tensor) pairs (unnamed tensors are named by position)."""
    if isinstance(params, torch.nn.Module):
        return list(params.named_parameters())
    if isinstance(params, dict):
        return list(params.items())
    out = []
    for i, item in enumerate(params):
        name, t = item if isinstance(item, tuple) else (str(i), item)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"OnlineMerger: entry {name!r} is a {type(t).__name__}, not a tensor")
        out.append((name, t))
    if not out:
        raise ValueError("OnlineMerger: no parameters given")
    return out


def window_weights(a: Average) -> np.ndarray:
    """The weight vector (length K, oldest first) of a windowed average."""
    k = int(a.value)
    if a.kind == "wma":
        return rvw.wma(k, k)
    if a.weights is None:
        return rvw.sma(k, k)
    w = np.asarray(a.weights(k) if callable(a.weights) else a.weights, dtype=float)
    if w.shape != (k,) or not np.all(np.isfinite(w)):
        raise ValueError(f"{a.name}: weights must be {k} finite numbers (oldest first), got shape {w.shape}")
    return w


class OnlineMerger:
    """Merges kept online over ``params`` (an nn.Module, or tensors / (name, tensor) pairs).

    ``averages``: a spec string (``extramerge.online.spec``) or ``Average`` items. ``every``: update at the
    steps divisible by it. ``device``: where the stores live (None: beside each parameter; "cpu": on the
    host, pinned, for CUDA parameters). ``dtype``: the stores' dtype (None: each parameter's; float32 keeps
    fp32 averages of bf16 weights). ``snapshot_every`` / ``snapshot_dir``: save every power-EMA (pema) every
    that many steps to ``snapshot_dir/NAME/step_XXXXXX`` (γ, step and updates in its record), in ``fmt``.
    """

    def __init__(
        self,
        params,
        averages: str | Sequence[Average] = "ema:0.999",
        *,
        every: int = 1,
        device=None,
        dtype=None,
        snapshot_every: int = 0,
        snapshot_dir=None,
        fmt: str | None = None,
    ):
        self.named = named_tensors(params)
        items = parse_spec(averages, "averages") if isinstance(averages, str) else resolve_names(averages)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if snapshot_every and snapshot_dir is None:
            raise ValueError("snapshot_every needs a snapshot_dir")
        self.items = {a.name: a for a in items}
        self.every, self.snapshot_every, self.snapshot_dir, self.fmt = (
            every,
            snapshot_every,
            snapshot_dir,
            fmt,
        )
        self.calls = self.updates = 0
        self.last_step: int | None = None
        like = self.locals()
        self.windows = {a.name: window_weights(a) for a in items if a.kind in WINDOWED}
        need = [len(self.windows[a.name]) for a in items if a.kind in WINDOWED]
        need += [len(self.windows[items[a.base].name]) + a.offset for a in items if self._on_window(a, items)]
        self.ring = Ring(like, max(need), device, dtype) if need else None
        self.emas: dict[str, RunningEMA] = {}
        for i, a in enumerate(items):
            if a.kind in ("ema", "pema"):
                d = max((e.offset for e in items if e.kind == "extra" and e.base == i), default=0)
                kw = {"decay": a.value} if a.kind == "ema" else {"gamma": a.value}
                self.emas[a.name] = RunningEMA(like, **kw, history=d, device=device, dtype=dtype)
        self.base_of = {a.name: items[a.base].name for a in items if a.kind == "extra"}

    @staticmethod
    def _on_window(a: Average, items) -> bool:
        return a.kind == "extra" and items[a.base].kind in WINDOWED

    # ------------------------------------------------------------------------------------ updating
    def locals(self) -> list[torch.Tensor]:
        """The parameters' local tensors now (re-read at each call: a wrapper may have replaced them)."""
        return [local_tensor(p) for _, p in self.named]

    def step(self) -> bool:
        """Count one optimizer step and update when the count is divisible by ``every``."""
        self.calls += 1
        return self.update(self.calls)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Take the parameters as they are after ``step`` into every average when ``step % every == 0``
        (call after optimizer.step()). Returns whether it did."""
        self.calls = step
        if step % self.every:
            return False
        src = self.locals()
        if self.ring is not None:
            self.ring.push(src, step)
        for ema in self.emas.values():
            ema.update(src, step)
        self.updates += 1
        self.last_step = step
        if self.snapshot_every and step % self.snapshot_every == 0:
            from .save import save_snapshots  # on first use: saving loads the checkpoint writers

            save_snapshots(self, step)
        return True

    # ------------------------------------------------------------------------------------- reading
    @property
    def names(self) -> list[str]:
        return list(self.items)

    def needed(self, name: str) -> int:
        """Updates ``name`` needs before it has a value."""
        a = self._item(name)
        if a.kind in WINDOWED:
            return len(self.windows[name])
        if a.kind == "extra":
            base = self.base_of[name]
            return (len(self.windows[base]) if base in self.windows else 1) + a.offset
        return 1

    def ready(self, name: str) -> bool:
        return self.updates >= self.needed(name)

    def ready_names(self) -> list[str]:
        return [n for n in self.items if self.ready(n)]

    def _item(self, name: str) -> Average:
        if name not in self.items:
            raise ValueError(f"no online average named {name!r}; this merger keeps {', '.join(self.items)}")
        return self.items[name]

    def coefficients(self, name: str) -> tuple[list[int], np.ndarray] | None:
        """(snapshot steps, weight vector) of a windowed merge or an Extra-Merge of one; None for EMAs."""
        a = self._item(name)
        if a.kind in WINDOWED:
            w = self.windows[name]
        elif a.kind == "extra" and self.base_of[name] in self.windows:
            w = rvw.extrapolate(self.windows[self.base_of[name]], a.offset, a.value)
        else:
            return None
        return self.ring.steps[-len(w) :], w

    def terms(self, name: str) -> list[tuple[float, list[torch.Tensor]]]:
        """The merge ``name`` as (coefficient, stored tensors) terms; a ValueError while it has no value."""
        a = self._item(name)
        if not self.ready(name):
            raise ValueError(f"{name} needs {self.needed(name)} updates, has {self.updates}")
        cw = self.coefficients(name)
        if cw is not None:
            w = cw[1]
            return [(float(c), s) for c, s in zip(w, self.ring.latest(len(w)), strict=True) if c != 0.0]
        if a.kind == "extra":
            ema = self.emas[self.base_of[name]]
            return [(1.0 + a.value, ema.current()), (-a.value, ema.before(a.offset))]
        return [(1.0, self.emas[name].current())]

    def describe(self, name: str) -> dict:
        """What a saved merge records: method, spec item, steps, updates and the weights it used."""
        a = self._item(name)
        rec = {
            "method": f"online-{a.kind}",
            "name": name,
            "spec": a.text or a.label(),
            "step": self.last_step,
        }
        rec |= {"updates": self.updates, "every": self.every}
        if a.kind == "ema":
            rec["decay"] = a.value
        if a.kind == "pema":
            rec["gamma"] = a.value
        if a.kind == "extra":
            rec |= {"alpha": a.value, "offset": a.offset, "base": self.base_of[name]}
        cw = self.coefficients(name)
        if cw is not None:
            rec |= {"snapshot_steps": list(cw[0]), "weights": [float(x) for x in cw[1]]}
        return rec

    def nbytes(self) -> dict[str, int]:
        """Bytes each store holds (the ring, each EMA with its history and staging buffer)."""
        out = {"ring": self.ring.nbytes()} if self.ring is not None else {}
        return out | {f"ema:{n}": e.nbytes() for n, e in self.emas.items()}

    def param_bytes(self) -> int:
        return nbytes(self.locals())

    # ------------------------------------------------------------------------------------- merging
    @contextlib.contextmanager
    def swapped(self, name: str):
        """Within the block the parameters hold the merge ``name``; on exit (exception included) the
        training weights are back, bit for bit. Costs one copy of the parameters (the backup)."""
        terms = self.terms(name)
        dst = self.locals()
        with torch.no_grad():
            backup = [t.clone() for t in dst]
        try:
            combine_into(dst, terms)
            yield self
        finally:
            combine_into(dst, [(1.0, backup)])

    def merged(self, name: str) -> Iterable[tuple[str, torch.Tensor]]:
        """(parameter name, merged local tensor), one at a time (one tensor's worth of extra memory)."""
        terms = self.terms(name)
        for i, (pname, p) in enumerate(self.named):
            (out,) = allocate([local_tensor(p)])
            combine_into([out], [(c, [xs[i]]) for c, xs in terms])
            yield pname, out

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        """The merge ``name`` as a state dict (DTensors for DTensor parameters: each rank its shard)."""
        params = dict(self.named)
        out = {}
        for pname, t in self.merged(name):
            p = params[pname]
            if DTensor is not None and isinstance(p, DTensor):
                t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[pname] = t
        return out

    def save(self, name: str, output, *, fmt: str | None = None, template=None, force: bool = False):
        """Write the merge ``name`` to ``output`` atomically, with its merge.json record (see
        ``extramerge.online.save.save_merge``)."""
        from .save import save_merge  # on first use: saving loads the checkpoint writers

        return save_merge(self, name, output, fmt=fmt or self.fmt, template=template, force=force)

    # --------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Everything to continue the averages after a restart (tensors on the CPU)."""
        return {
            "names": list(self.items),
            "calls": self.calls,
            "updates": self.updates,
            "last_step": self.last_step,
            "ring": self.ring.state_dict() if self.ring is not None else None,
            "emas": {n: e.state_dict() for n, e in self.emas.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.items):
            raise ValueError(f"online state keeps {state['names']}, this merger keeps {list(self.items)}")
        self.calls, self.updates, self.last_step = state["calls"], state["updates"], state["last_step"]
        if self.ring is not None:
            self.ring.load_state_dict(state["ring"])
        for n, e in self.emas.items():
            e.load_state_dict(state["emas"][n])
