"""Optimizers batched over seeds, in functional style, mirroring ``torch.optim`` update rules exactly.

Each optimizer is a small object with

    state = opt.init(theta)                       # theta: [S, p]
    theta = opt.step(theta, grad, lr, state)      # one update for all S seeds at once

``step`` updates ``theta`` and ``state`` **in place** (no copy of the [S, p] batch per step) and returns
``theta``; clone first if you need the old value. ``grad`` is never modified. ``lr`` is a Python float for
this step (schedules live in :mod:`rivervalley.schedules`).

- :class:`SGD`: ``torch.optim.SGD`` (momentum, dampening, Nesterov, coupled weight decay);
- :class:`Adam`: ``torch.optim.AdamW`` (``decoupled=True``, the default) or ``torch.optim.Adam``;
- :class:`Muon`: ``torch.optim.Muon`` (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/)
  on each seed's ``[a, b]`` matrix, with a batched Newton–Schulz iteration over ``[S, a, b]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SGD", "Adam", "Muon", "zeropower_via_newtonschulz", "muon_lr_ratio", "get_optimizer"]


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=True) -> float:
    value = float(value)
    ok = (
        math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    return lr


class SGD:
    """SGD as in ``torch.optim.SGD``: g ← g + wd·θ; b ← g (first step) else μ·b + (1 − dampening)·g;
    g ← g + μ·b (Nesterov) or b; θ ← θ − η·g."""

    def __init__(
        self, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, dampening: float = 0.0
    ):
        self.momentum = _check_range("momentum", momentum, 0.0, 1.0)
        self.weight_decay = _check_range("weight_decay", weight_decay, 0.0, math.inf)
        self.dampening = _check_range("dampening", dampening, 0.0, 1.0, hi_open=False)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")

    @property
    def is_plain(self) -> bool:
        """True for vanilla SGD (no momentum, no weight decay): the update is θ ← θ − η g."""
        return self.momentum == 0 and self.weight_decay == 0

    def init(self, theta: torch.Tensor) -> dict:
        return {"step": 0, "momentum_buffer": None}

    def step(self, theta: torch.Tensor, grad: torch.Tensor, lr: float, state: dict) -> torch.Tensor:
        lr = _check_lr(lr)
        state["step"] += 1
        if self.weight_decay != 0:
            grad = grad.add(theta, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        return theta.add_(grad, alpha=-lr)

    def __repr__(self) -> str:
        return (
            f"SGD(momentum={self.momentum}, nesterov={self.nesterov}, weight_decay={self.weight_decay}, "
            f"dampening={self.dampening})"
        )


class Adam:
    """Adam (Kingma & Ba 2015) as in ``torch.optim``; ``decoupled=True`` is AdamW (Loshchilov & Hutter 2019):

    θ ← θ(1 − η·wd)  [decoupled]   or   g ← g + wd·θ  [coupled]
    m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
    θ ← θ − (η / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
    """

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = True,
    ):
        b1, b2 = betas
        self.betas = (_check_range("betas[0]", b1, 0.0, 1.0), _check_range("betas[1]", b2, 0.0, 1.0))
        self.eps = _check_range("eps", eps, 0.0, math.inf)
        self.weight_decay = _check_range("weight_decay", weight_decay, 0.0, math.inf)
        self.decoupled = bool(decoupled)

    def init(self, theta: torch.Tensor) -> dict:
        return {"step": 0, "exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta)}

    def step(self, theta: torch.Tensor, grad: torch.Tensor, lr: float, state: dict) -> torch.Tensor:
        lr = _check_lr(lr)
        b1, b2 = self.betas
        state["step"] += 1
        t = state["step"]
        if self.weight_decay != 0:
            if self.decoupled:
                theta.mul_(1 - lr * self.weight_decay)
            else:
                grad = grad.add(theta, alpha=self.weight_decay)
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = lr / (1 - b1**t)
        bc2_sqrt = (1 - b2**t) ** 0.5
        denom = (state["exp_avg_sq"].sqrt() / bc2_sqrt).add_(self.eps)
        return theta.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def __repr__(self) -> str:
        return (
            f"Adam(betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
            f"decoupled={self.decoupled})"
        )


def zeropower_via_newtonschulz(
    g: torch.Tensor,
    ns_coefficients=(3.4445, -4.775, 2.0315),
    ns_steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Approximate orthogonalisation U Vᵀ of each matrix in ``g`` ([a, b] or [..., a, b]) by the quintic
    Newton–Schulz iteration X ← aX + (b·XXᵀ + c·(XXᵀ)²)X after X ← G/‖G‖_F, run on the wide orientation.

    Mirrors ``torch.optim._muon._zeropower_via_newtonschulz`` op for op (same rounding) when ``dtype`` is
    ``torch.bfloat16``; ``dtype=None`` computes in ``g``'s own dtype. Returns a tensor of that dtype.
    """
    if not 0 < ns_steps < 100:
        raise ValueError(f"ns_steps must be in [1, 100), got {ns_steps}")
    if len(ns_coefficients) != 3:
        raise ValueError("ns_coefficients must have exactly 3 values")
    if g.ndim < 2:
        raise ValueError(f"g must be a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    a, b, c = (float(x) for x in ns_coefficients)
    x = g.to(dtype) if dtype is not None else g
    batch = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        upd = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, upd, x, beta=a)
    if transposed:
        x = x.mT
    return x.reshape(*batch, *x.shape[-2:])


def muon_lr_ratio(shape: tuple[int, int], adjust_lr_fn: str | None = None) -> float:
    """Muon's learning-rate multiplier for an [A, B] matrix: √max(1, A/B) (``None``/``'original'``, Keller
    Jordan) or 0.2·√max(A, B) (``'match_rms_adamw'``, Liu et al. 2025, "Muon is Scalable for LLM
    Training")."""
    a, b = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


class Muon:
    """Muon as in ``torch.optim.Muon``, for a parameter vector that is one [a, b] matrix per seed:

        B ← μB + (1 − μ)g   (torch's lerp form);   Ũ ← (1 − μ)g + μB (Nesterov) or B
        O ← NS(Ũ);   θ ← θ(1 − η·wd);   θ ← θ − η·ratio(shape)·O

    ``ns_dtype`` is the Newton–Schulz compute dtype: ``torch.bfloat16`` reproduces torch.optim.Muon (which
    always orthogonalises in bfloat16; for S = 1 the result is bitwise identical), ``None`` (default) uses
    θ's dtype so the toy model is free of bfloat16 rounding noise. With S > 1 in bfloat16, per-seed results
    can differ from torch's by bfloat16 rounding flips, because CPU kernels round differently depending on
    a matrix's memory alignment inside the batch.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        weight_decay: float = 0.1,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype | None = None,
    ):
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (a, b) with a, b >= 1, got {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.momentum = _check_range("momentum", momentum, 0.0, 1.0)
        self.nesterov = bool(nesterov)
        if len(ns_coefficients) != 3:
            raise ValueError("ns_coefficients must have exactly 3 values")
        self.ns_coefficients = tuple(float(x) for x in ns_coefficients)
        self.eps = _check_range("eps", eps, 0.0, math.inf)
        if not 0 < int(ns_steps) < 100:
            raise ValueError(f"ns_steps must be in [1, 100), got {ns_steps}")
        self.ns_steps = int(ns_steps)
        self.weight_decay = _check_range("weight_decay", weight_decay, 0.0, math.inf)
        self.lr_ratio = muon_lr_ratio(self.shape, adjust_lr_fn)
        self.adjust_lr_fn = adjust_lr_fn
        self.ns_dtype = ns_dtype

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 2 or t.shape[1] != self.shape[0] * self.shape[1]:
            raise ValueError(
                f"expected [S, {self.shape[0] * self.shape[1]}] for shape {self.shape}, got {tuple(t.shape)}"
            )
        return t.view(t.shape[0], *self.shape)

    def init(self, theta: torch.Tensor) -> dict:
        return {"step": 0, "momentum_buffer": torch.zeros_like(self._view(theta))}

    def step(self, theta: torch.Tensor, grad: torch.Tensor, lr: float, state: dict) -> torch.Tensor:
        lr = _check_lr(lr)
        state["step"] += 1
        w, g = self._view(theta), self._view(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(g, 1 - self.momentum)
        update = g.lerp(buf, self.momentum) if self.nesterov else buf
        ortho = zeropower_via_newtonschulz(
            update, self.ns_coefficients, self.ns_steps, self.eps, self.ns_dtype
        )
        w.mul_(1 - lr * self.weight_decay)
        w.add_(ortho, alpha=-lr * self.lr_ratio)
        return theta

    def __repr__(self) -> str:
        return (
            f"Muon(shape={self.shape}, momentum={self.momentum}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay}, adjust_lr_fn={self.adjust_lr_fn!r}, "
            f"ns_dtype={self.ns_dtype})"
        )


_OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": Adam, "muon": Muon}


def get_optimizer(name: str, **kw):
    """Build an optimizer by name: ``'sgd'``, ``'adam'`` (coupled weight decay), ``'adamw'``, ``'muon'``."""
    key = name.lower()
    if key not in _OPTIMIZERS:
        raise ValueError(f"name must be one of {sorted(_OPTIMIZERS)}, got {name!r}")
    if key == "adam":
        kw.setdefault("decoupled", False)
    return _OPTIMIZERS[key](**kw)
