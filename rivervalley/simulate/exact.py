"""The exact fast path: closed-form s-step AR(1) transitions of every eigen-coordinate (SGD, quadratic,
constant learning rate) and the jumps from checkpoint to checkpoint built on them.
"""

from __future__ import annotations

import numpy as np
import torch

from rivervalley.landscapes import EigenQuadratic, QuadraticRiverValley
from rivervalley.optimizers import SGD
from rivervalley.simulate.plan import is_constant_lr

__all__ = ["exact_transition", "check_exact", "run_exact"]


def _pow_and_geom(lr: float, h: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """ρ = (1 − ηh)^s and Σ_{j<s} (1 − ηh)^{2j}, accurate also when ηh is tiny."""
    eh = lr * h
    a = 1.0 - eh
    pos = eh < 1  # a > 0: log1p keeps log(1 − ηh) accurate for tiny ηh
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_abs = np.where(pos, np.log1p(-np.where(pos, eh, 0.0)), np.log(np.abs(a)))
        rho = np.sign(a) ** s * np.exp(s * log_abs)
        log_q = 2.0 * log_abs  # q = a², Σ_{j<s} q^j = expm1(s log q) / expm1(log q)
        geom = np.where(log_q == 0, float(s), np.expm1(s * log_q) / np.expm1(log_q))
    return rho, geom


def exact_transition(landscape: EigenQuadratic, lr: float, s: int, sigma_eigen: np.ndarray):
    """Exact s-step SGD transition of each eigen-coordinate: z_{t+s} = ρ z_t + d + √q·ξ.

    Valley/curved river (h > 0): ρ = (1 − ηh)^s, d = (1 − ρ)·c_k/h (c_0 = slope, else 0),
    q = η²σ_k² Σ_{j<s}(1 − ηh)^{2j} (= V(1 − ρ²) when stationary). Flat direction (h = 0): ρ = 1,
    d = η c_k s, q = η²σ_k² s. Returns numpy ``(rho, drift, innovation_std)``, each [p].
    """
    h = landscape.hessian_eigen()
    c = np.zeros_like(h)
    c[0] = landscape.slope
    rho, geom = _pow_and_geom(lr, h, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = np.where(h > 0, (1.0 - rho) * c / np.where(h > 0, h, 1.0), lr * c * s)
    innov = lr * np.asarray(sigma_eigen, dtype=np.float64) * np.sqrt(geom)
    return rho, drift, innov


def check_exact(landscape, optimizer, sched, record_loss_every) -> None:
    if not isinstance(landscape, EigenQuadratic):
        raise ValueError(f"exact=True needs a quadratic landscape, got {type(landscape).__name__}")
    if not (isinstance(optimizer, SGD) and optimizer.is_plain):
        raise ValueError(f"exact=True needs plain SGD (no momentum, no weight decay), got {optimizer!r}")
    if not is_constant_lr(sched):
        raise ValueError("exact=True needs a constant lr (a float or schedules.constant)")
    if record_loss_every is not None:
        raise ValueError("record_loss_every is not available with exact=True (it skips the steps in between)")


def run_exact(landscape, theta, lr, steps, ckpts, ckpt_tensor, sigma, source):
    """Jump θ_0 → θ_{ckpt_0} → ... → θ_steps by :func:`exact_transition` in eigen-coordinates. In the
    eigenbasis (unrotated quadratic) each jump's result goes straight to its checkpoint slot: with the
    native kernel it updates θ's buffer in place and streams the values to the slot in the same pass
    (:func:`_run_exact_native`); with torch it writes into the slot and continues from there."""
    dtype, device = theta.dtype, theta.device
    noisy = bool(np.any(sigma))
    identity = isinstance(landscape, QuadraticRiverValley) and not landscape.rotate
    slot = {int(c): k for k, c in enumerate(ckpts)}
    cache: dict[int, tuple] = {}

    def transition(s: int) -> tuple:
        if s not in cache:
            cache[s] = tuple(
                torch.as_tensor(x, dtype=dtype, device=device)
                for x in exact_transition(landscape, lr, s, sigma)
            )
        return cache[s]

    targets = list(dict.fromkeys([int(c) for c in ckpts] + [steps]))
    if identity and noisy and source.native is not None:
        return _run_exact_native(theta, targets, slot, ckpt_tensor, transition, source.native)
    z = theta if identity else landscape.to_eigen(theta)  # theta is our own copy: update it in place
    t = 0
    for target in targets:
        s = target - t
        k = slot.get(target)
        if s > 0:
            rho, drift, innov = transition(s)
            # into the checkpoint slot, else back into theta's buffer (z may be a stored slot by now)
            dst = (ckpt_tensor[:, k] if k is not None else theta) if identity else z
            torch.addcmul(drift, z, rho, out=dst)
            if noisy:
                dst.addcmul_(source.draw(), innov)
            z, t = dst, target
            if identity and k is not None:
                continue  # already stored
        if k is not None:
            ckpt_tensor[:, k].copy_(z if identity else landscape.from_eigen(z))
    if not identity:
        return landscape.from_eigen(z).contiguous()
    return z if z is theta else z.clone(memory_format=torch.contiguous_format)  # never a view of a slot


def _run_exact_native(theta, targets, slot, ckpt_tensor, transition, native):
    """The exact path on the native kernel, in θ's own buffer: each run of equal jumps that land on
    consecutive checkpoint slots is one kernel call (every thread takes its rows through all of them and
    streams each result into its slot); a jump past the last checkpoint updates θ alone."""
    t = i = 0
    while i < len(targets):
        target, k = targets[i], slot.get(targets[i])
        s = target - t
        if s == 0:  # step 0: a checkpoint there, or steps=0
            if k is not None:
                ckpt_tensor[:, k].copy_(theta)
            i += 1
            continue
        if k is None:
            native.affine(theta, *transition(s))
            t, i = target, i + 1
            continue
        n = 1
        while (
            i + n < len(targets)
            and targets[i + n] - targets[i + n - 1] == s
            and slot.get(targets[i + n]) == k + n
        ):
            n += 1
        native.jumps(theta, *transition(s), ckpt_tensor[:, k : k + n])
        t, i = targets[i + n - 1], i + n
    return theta
