"""The simulator entry point :func:`simulate`: checks the arguments, picks the path (exact or step) and the
noise backend, and fills the checkpoint tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rivervalley.common.resources import flush_denormals
from rivervalley.landscapes import EigenQuadratic, Landscape
from rivervalley.optimizers import SGD
from rivervalley.simulate.budget import optimizer_buffers, require_simulation_memory, simulation_bytes
from rivervalley.simulate.exact import check_exact, run_exact
from rivervalley.simulate.noise import NoiseSource, resolve_backend
from rivervalley.simulate.plan import checkpoint_plan, int_at_least, lr_array, nonneg_float
from rivervalley.simulate.result import SimResult
from rivervalley.simulate.start import initial_theta
from rivervalley.simulate.steps import run_steps

__all__ = ["simulate"]


def simulate(
    landscape: Landscape,
    optimizer=None,
    *,
    steps: int | None = None,
    lr: float | Callable[[int], float],
    seeds: int = 1,
    noise: float = 0.0,
    river_noise: float | None = None,
    noise_kind: str = "additive",
    ckpt_every: int | None = None,
    n_ckpts: int | None = None,
    ckpt_from: int = 0,
    init="zero",
    river_start: float | None = None,
    exact: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    noise_dtype: torch.dtype = torch.float32,
    noise_threads: int | None = None,
    noise_backend: str = "auto",
    record_loss_every: int | None = None,
    out: torch.Tensor | None = None,
) -> SimResult:
    """Run ``optimizer`` (default plain :class:`~rivervalley.optimizers.SGD`) on ``landscape`` for ``seeds``
    independent runs at once and return a :class:`SimResult`.

    ``lr``: a float or a schedule ``step -> lr`` (:mod:`rivervalley.schedules`), evaluated at steps
    0..steps−1. ``init``: ``'zero'`` (θ_0 = 0), ``'stationary'`` (quadratics: every eigen-coordinate with
    h > 0 drawn from its stationary N(0, V) of THEORY §a at η = lr(0), centred on the floor; the river
    coordinate starts at ``river_start``, default u* = c/μ for a curved river, 0 for a linear one, plus
    N(0, V_u) when curved), or a tensor [p] or [S, p]. ``exact=True`` uses the closed-form AR(1) jumps
    (quadratic landscape, plain SGD, constant lr; otherwise ValueError).

    Randomness: one seed ``seed`` fixes everything, for a given S, p and noise backend (not per seed), on
    a given build: the native kernel's float32 transform may round differently (by ~1e-7) when compiled
    for another CPU or with the fallback flags.
    ``noise_backend``:

    - ``'native'`` (CPU, float32/float64 parameters, ``noise_dtype`` float32): the compiled kernel of
      :mod:`rivervalley._native`, Philox4x32-10 counter-based uniforms and a float32 Box-Muller transform,
      fused with the update so that no noise tensor is written (plain SGD on an unrotated quadratic, and
      every exact-path jump); other optimizers get its normals as a tensor. Split over ``noise_threads``
      threads (default ``torch.get_num_threads()``); normal (i, j) of each draw depends on (seed, i, j) only;
    - ``'torch'``: ``torch.randn`` in ``noise_dtype`` (float32 by default: several times faster than its
      float64 sampler on CPU), converted to ``dtype``; batches with S·p ≥ 2^17 are drawn as 4 independent
      row-block streams by ``noise_threads`` Python threads (default one per core, up to 4) while the
      previous step computes. ``noise_dtype=torch.float64`` gives full-precision draws;
    - ``'auto'`` (default): ``'native'`` when it applies and the kernel compiled, else ``'torch'``.

    Float32 draws have 24-bit resolution, so tails beyond ~5.8σ are cut (probability < 1e-8).
    ``config['noise_backend']`` of the result records the backend used.

    ``out``: an optional [S, N, p] tensor (``dtype``, ``device``) to receive the checkpoints, for example
    reused across repeated simulations so that fresh memory need not be mapped each time.
    """
    if not isinstance(landscape, Landscape):
        raise ValueError(f"landscape must be a rivervalley Landscape, got {type(landscape).__name__}")
    optimizer = SGD() if optimizer is None else optimizer
    s_count = int_at_least("seeds", seeds, 1)
    noise = nonneg_float("noise", noise)
    river_noise = None if river_noise is None else nonneg_float("river_noise", river_noise)
    steps, first, every, n_count = checkpoint_plan(
        steps, ckpt_every=ckpt_every, n_ckpts=n_ckpts, ckpt_from=ckpt_from
    )
    if record_loss_every is not None:
        record_loss_every = int_at_least("record_loss_every", record_loss_every, 1)
    if noise_threads is not None:
        noise_threads = int_at_least("noise_threads", noise_threads, 1)
    device = torch.device(device)
    backend = resolve_backend(noise_backend, device, dtype, noise_dtype)
    ckpt_shape = (s_count, n_count, landscape.dim)
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != ckpt_shape:
            raise ValueError(f"out must be a tensor of shape {list(ckpt_shape)} (seeds, checkpoints, dim)")
        same_device = out.device.type == device.type and (
            device.index is None or out.device.index == device.index
        )
        if out.dtype != dtype or not same_device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor on {device}")
    if device.type == "cpu":  # every allocation below, projected before the first one
        _check_memory(ckpt_shape, steps, dtype, noise_dtype, backend, optimizer, exact, out is None)
    ckpts = first + every * np.arange(n_count, dtype=np.int64)
    lrs, sched = lr_array(lr, steps)
    landscape = landscape.to(device, dtype)
    noise_fn = landscape.make_noise(noise, river_noise, noise_kind)  # validates noise_kind
    if exact:
        check_exact(landscape, optimizer, sched, record_loss_every)
    config = {
        "optimizer": repr(optimizer),
        "lr": repr(sched),
        "seeds": s_count,
        "noise": noise,
        "river_noise": river_noise,
        "noise_kind": noise_kind,
        "exact": bool(exact),
        "seed": int(seed),
        "init": init if isinstance(init, str) else "tensor",
        "landscape": landscape.describe(),
    }

    config["noise_backend"] = backend
    source = NoiseSource(
        (s_count, landscape.dim),
        seed,
        noise_dtype,
        device,
        out_dtype=dtype,
        threads=noise_threads,
        backend=backend,
    )
    try:
        theta = initial_theta(
            landscape,
            init,
            s_count,
            float(lrs[0]),
            noise,
            river_noise,
            noise_kind,
            river_start,
            source.init_gen,
            device,
            dtype,
        )
        ckpt_tensor = torch.empty(ckpt_shape, dtype=dtype, device=device) if out is None else out
        with flush_denormals(), torch.no_grad():
            if exact:
                theta = run_exact(
                    landscape,
                    theta,
                    float(lrs[0]),
                    steps,
                    ckpts,
                    ckpt_tensor,
                    landscape.noise_std(noise, river_noise, noise_kind),
                    source,
                )
                loss_steps = loss_curve = None
            else:
                theta, loss_steps, loss_curve = run_steps(
                    landscape,
                    optimizer,
                    theta,
                    lrs,
                    steps,
                    ckpts,
                    ckpt_tensor,
                    noise_fn,
                    landscape.noise_std(noise, river_noise, noise_kind)
                    if isinstance(landscape, EigenQuadratic)
                    else None,
                    source,
                    record_loss_every,
                )
    finally:
        source.close()
    return SimResult(
        checkpoints=ckpt_tensor,
        ckpt_steps=ckpts,
        final=theta,
        steps=steps,
        landscape=landscape,
        loss_curve=loss_curve,
        loss_steps=loss_steps,
        config=config,
    )


def _check_memory(ckpt_shape, steps, dtype, noise_dtype, backend, optimizer, exact, own_out) -> None:
    """Refuse a run whose allocations (checkpoints, state, noise, results per seed, schedule) do not fit
    in available memory (:mod:`rivervalley.simulate.budget`)."""
    s, n, p = ckpt_shape
    item = torch.empty((), dtype=dtype).element_size()
    noise_item = torch.empty((), dtype=noise_dtype).element_size()
    parts = simulation_bytes(
        seeds=s,
        dim=p,
        n_ckpts=n,
        steps=steps,
        item=item,
        noise_item=noise_item,
        native=backend == "native",
        buffers=optimizer_buffers(optimizer),
        exact=exact,
        checkpoints=own_out,
    )
    require_simulation_memory(
        parts,
        sizes=f"{s} seeds x {n} checkpoints x {p} parameters",
        dtype=dtype,
        hint="fewer seeds or checkpoints need less",
    )
