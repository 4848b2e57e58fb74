"""The step path: one batched optimizer step per iteration (a fused update, or the native kernel, for plain
SGD on an unrotated quadratic).
"""

from __future__ import annotations

import numpy as np
import torch

from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.optimizers import SGD

__all__ = ["run_steps"]


def run_steps(
    landscape, optimizer, theta, lrs, steps, ckpts, ckpt_tensor, noise_fn, sigma, source, record_loss_every
):
    """One batched optimizer step per iteration. Plain SGD on an unrotated quadratic takes a fused update
    θ ← θ ⊙ (1 − ηh) + ηc·e_0 − η σ ⊙ ξ (two passes over θ, no gradient buffer); everything else computes
    g = ∇L(θ) + noise into a reused buffer and calls ``optimizer.step``."""
    fused = (
        isinstance(landscape, QuadraticRiverValley)
        and not landscape.rotate
        and isinstance(optimizer, SGD)
        and optimizer.is_plain
    )
    if fused and noise_fn is not None and source.native is not None:
        return _run_native_sgd(
            landscape, theta, lrs, steps, ckpts, ckpt_tensor, sigma, source, record_loss_every
        )
    state = optimizer.init(theta)
    gbuf = torch.empty_like(theta)
    if fused:
        h = landscape.eigenvalues
        std = torch.as_tensor(sigma, dtype=theta.dtype, device=theta.device)
        iso = bool(np.all(sigma == sigma[0]))
        slope = landscape.slope
        cur_lr = None
    loss_steps, loss_vals = [], []
    k = 0
    for t in range(steps + 1):
        while k < len(ckpts) and ckpts[k] == t:
            ckpt_tensor[:, k].copy_(theta)
            k += 1
        if record_loss_every is not None and t % record_loss_every == 0:
            loss_steps.append(t)
            loss_vals.append(float(landscape.loss(theta).mean()))
        if t == steps:
            break
        lr = float(lrs[t])
        if fused:
            if lr != cur_lr:
                cur_lr, decay, coef = lr, 1.0 - lr * h, -lr * std
            theta.mul_(decay)
            if noise_fn is not None:
                if iso:
                    theta.add_(source.draw(), alpha=-lr * float(sigma[0]))
                else:
                    theta.addcmul_(source.draw(), coef)
            if slope != 0:
                theta[:, 0] += lr * slope
        else:
            g = landscape.grad_into(theta, gbuf)
            if noise_fn is not None:
                noise_fn(g, source.draw(), theta)
            theta = optimizer.step(theta, g, lr, state)
    if record_loss_every is None:
        return theta, None, None
    return theta, np.asarray(loss_steps, dtype=np.int64), np.asarray(loss_vals, dtype=np.float64)


def _run_native_sgd(landscape, theta, lrs, steps, ckpts, ckpt_tensor, sigma, source, record_loss_every):
    """Plain SGD with noise on an unrotated quadratic, by the native kernel: the steps between two events
    (a checkpoint, a loss record, the end) are one kernel call, in which every thread takes its rows
    through all those steps; the call that ends on a checkpoint streams the result into its slot."""
    h = landscape.eigenvalues
    g = torch.zeros_like(h)
    g[0] = landscape.slope
    sd = torch.as_tensor(sigma, dtype=theta.dtype, device=theta.device)
    lr_all = torch.from_numpy(np.ascontiguousarray(lrs[:steps], dtype=np.float64))
    marks = set(int(c) for c in ckpts) | {steps}
    if record_loss_every is not None:
        marks |= set(range(0, steps + 1, record_loss_every))
    loss_steps, loss_vals = [], []
    k = t = 0
    for m in sorted(marks):
        if m > t:
            land = k < len(ckpts) and ckpts[k] == m
            source.native.sgd_steps(theta, h, g, sd, lr_all[t:m], copy=ckpt_tensor[:, k] if land else None)
            k, t = k + land, m
        while k < len(ckpts) and ckpts[k] == t:  # only step 0, which no call has landed on
            ckpt_tensor[:, k].copy_(theta)
            k += 1
        if record_loss_every is not None and t % record_loss_every == 0:
            loss_steps.append(t)
            loss_vals.append(float(landscape.loss(theta).mean()))
    if record_loss_every is None:
        return theta, None, None
    return theta, np.asarray(loss_steps, dtype=np.int64), np.asarray(loss_vals, dtype=np.float64)
