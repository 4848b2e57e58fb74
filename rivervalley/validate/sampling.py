"""Per-seed statistics of simulated trajectories (numpy, seeds on axis 0, checkpoints on axis 1) and the
samplers built on them (§d ΔL(α), §e FVE_1, §f decay versus average), simulated in memory-bounded chunks
with the Gaussian draws chosen by :func:`using_noise_backend`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.signal import lfilter

from rivervalley import analysis, theory
from rivervalley import weights as W
from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.schedules import wsd
from rivervalley.simulate import simulate

__all__ = [
    "NOISE_BACKENDS",
    "using_noise_backend",
    "window_means",
    "ema_path",
    "ema_burn",
    "landscape_loss",
    "per_seed",
    "stationary_per_seed",
    "stack_stats",
    "delta_loss_samples",
    "fve_samples",
    "decay_gain_discrete",
    "decay_plan",
    "decay_average_samples",
]

_CHUNK_ELEMENTS = 4_000_000  # float64 entries of one simulate() call's checkpoint tensor (32 MB)
_CHUNK_SEEDS = 512  # seeds per simulate() call: larger batches cost more per element on CPU
# How the simulations draw their Gaussians. Default 'torch': full-precision float64 draws, so that the
# validation need not argue that 24-bit draws are exact enough at the 1e-4 level its standard errors
# reach. 'native': the simulator's own default, the compiled Philox kernel with float32 Box-Muller draws.
NOISE_BACKENDS = {
    "torch": {"noise_dtype": torch.float64, "noise_backend": "torch"},
    "native": {"noise_dtype": torch.float32, "noise_backend": "native"},
}
_NOISE = contextvars.ContextVar("rivervalley_validate_noise", default=NOISE_BACKENDS["torch"])


@contextlib.contextmanager
def using_noise_backend(name: str):
    """Within the ``with`` block, simulations draw their Gaussians as ``NOISE_BACKENDS[name]`` says."""
    token = _NOISE.set(NOISE_BACKENDS[name])
    try:
        yield
    finally:
        _NOISE.reset(token)


def window_means(x: np.ndarray, window: int) -> np.ndarray:
    """Means of every K consecutive checkpoints: [S, N, ...] -> [S, N − K + 1, ...] (row j ends at j+K−1)."""
    c = np.cumsum(x, axis=1)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    return (c[:, window:] - c[:, :-window]) / window


def ema_path(x: np.ndarray, decay: float) -> np.ndarray:
    """m_k = β m_{k−1} + (1−β) x_k along axis 1, started at m_1 = x_1."""
    return lfilter([1.0 - decay], [1.0, -decay], x, axis=1, zi=decay * x[:, :1])[0]


def ema_burn(decay: float, tol: float = 1e-12) -> int:
    """Checkpoints after which an EMA's start weight β^n is below ``tol``."""
    return int(math.ceil(math.log(tol) / math.log(decay))) if decay > 0 else 1


def landscape_loss(landscape, x: np.ndarray) -> np.ndarray:
    """The landscape's own loss on points [..., p] (numpy in, numpy out)."""
    flat = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
    return landscape.loss(flat).numpy().reshape(x.shape[:-1])


def _chunks(seeds: int, per_seed_elements: int) -> list[int]:
    size = max(1, min(seeds, _CHUNK_SEEDS, _CHUNK_ELEMENTS // max(1, per_seed_elements)))
    return [min(size, seeds - i) for i in range(0, seeds, size)]


def per_seed(stats: Callable, seeds: int, seed: int, per_seed_elements: int, landscape, **sim) -> np.ndarray:
    """Simulate in memory-bounded chunks of seeds and stack ``stats(result)`` ([chunk, R]) over chunks."""
    out = []
    for i, c in enumerate(_chunks(seeds, per_seed_elements)):
        res = simulate(landscape, seeds=c, seed=seed * 1009 + i, **_NOISE.get(), **sim)
        out.append(np.asarray(stats(res), dtype=np.float64).reshape(c, -1))
    return np.concatenate(out, axis=0)


def stationary_per_seed(stats: Callable, seeds: int, seed: int, land, *, lr, interval, n_ckpts, burn):
    """:func:`per_seed` on the stationary protocol: zero start, unit valley noise, no river noise,
    ``n_ckpts`` checkpoints every ``interval`` steps after ``burn`` intervals of burn-in."""
    return per_seed(
        stats,
        seeds,
        seed,
        n_ckpts * land.dim,
        land,
        lr=lr,
        noise=1.0,
        river_noise=0.0,
        ckpt_every=interval,
        n_ckpts=n_ckpts,
        ckpt_from=burn * interval,
        init="zero",
    )


def stack_stats(fns, x) -> np.ndarray:
    return np.stack([fn(x) for fn in fns], axis=1)


def _burn_in(lr: float, curvatures, interval: int, tol: float = 1e-12) -> int:
    """Checkpoints after which a start at θ_0 = 0 is stationary to ``tol`` in variance: ρ_max^{2B} ≤ tol."""
    rho = np.abs(1.0 - lr * np.asarray(curvatures, dtype=float)).max() ** interval
    return 1 if rho == 0 else int(math.ceil(math.log(tol) / math.log(rho) / 2)) + 1


def delta_loss_samples(
    alphas, *, slope, lr, interval, window, offset, curvatures, seeds, n_ckpts, seed=0
) -> np.ndarray:
    """Per-seed ΔL(α) = mean_k [L(E_k(α)) − L(θ_k)] on a linear river (σ_u = 0, σ = 1), step path from
    θ_0 = 0 after a burn-in to stationarity. Returns [seeds, len(alphas)]."""
    avals = [float(a) for a in np.atleast_1d(alphas)]
    land = QuadraticRiverValley(slope=slope, curvatures=list(curvatures))
    burn = _burn_in(lr, curvatures, interval)
    first = window - 1 + offset

    def stats(res):
        m = window_means(res.checkpoints.numpy(), window)
        last_loss = res.ckpt_loss.numpy()[:, first:]
        return np.stack(
            [
                (landscape_loss(land, (1 + a) * m[:, offset:] - a * m[:, :-offset]) - last_loss).mean(1)
                for a in avals
            ],
            axis=1,
        )

    return stationary_per_seed(stats, seeds, seed, land, lr=lr, interval=interval, n_ckpts=n_ckpts, burn=burn)


def fve_samples(*, slope, lr, interval, curvatures, n, windows, seeds, n_ckpts, seed=0) -> dict:
    """Per-seed §e statistics of n consecutive SMA-merged checkpoints (σ_u = 0, σ = 1, step path from θ_0 = 0
    after a burn-in): for each K in ``windows`` a dict of [seeds] arrays ``fve`` (FVE_1), ``total``
    (trace of the centred Gram) and ``aligned`` (τᵀ C τ / |τ|²), each averaged over the disjoint blocks of
    n + K − 1 raw checkpoints that fit in ``n_ckpts``."""
    land = QuadraticRiverValley(slope=slope, curvatures=list(curvatures))
    burn = _burn_in(lr, curvatures, interval)
    tau = np.arange(1, n + 1) - (n + 1) / 2
    windows = [int(K) for K in windows]
    if n_ckpts < n + max(windows) - 1:
        raise ValueError(f"n_ckpts={n_ckpts} must be >= n + max(windows) - 1 = {n + max(windows) - 1}")

    def stats(res):
        th = res.checkpoints.numpy()
        cols = []
        for K in windows:
            length = n + K - 1
            blocks = th.shape[1] // length
            x = th[:, : blocks * length].reshape(th.shape[0], blocks, length, -1)
            x = x - x[:, :, :1]  # translation leaves the centred Gram unchanged; it avoids cancellation
            cg = analysis.centered_gram(analysis.merged_gram(analysis.gram(x), W.merge_matrix(length, K)))
            cols += [
                analysis.fve1(cg).mean(1),
                np.trace(cg, axis1=-2, axis2=-1).mean(1),
                (np.einsum("j,...jl,l->...", tau, cg, tau) / (tau @ tau)).mean(1),
            ]
        return np.stack(cols, axis=1)

    vals = stationary_per_seed(stats, seeds, seed, land, lr=lr, interval=interval, n_ckpts=n_ckpts, burn=burn)
    return {
        K: {"fve": vals[:, 3 * i], "total": vals[:, 3 * i + 1], "aligned": vals[:, 3 * i + 2]}
        for i, K in enumerate(windows)
    }


def decay_gain_discrete(lrs: np.ndarray, lam: float, v0: float, noise: float = 1.0) -> float:
    """Exact variance after SGD steps with learning rates ``lrs``: P ← (1 − η_tλ)²P + η_t²σ², from P = v0."""
    p = v0
    for e in lrs:
        p = (1 - e * lam) ** 2 * p + (e * noise) ** 2
    return p


def decay_plan(x: float, lr: float, curvature: float):
    """T = round(x/(ηλ)) steps, a burn-in that is stationary to 1e-12, and the decay η(1 − t/T), t < T."""
    steps = int(round(x / (lr * curvature)))
    burn = int(math.ceil(math.log(1e-12) / math.log(1 - lr * curvature) / 2))
    return steps, burn, wsd(lr, steps, decay_steps=steps)


def decay_average_samples(
    x: float,
    *,
    lr: float,
    curvature: float,
    m: int,
    seeds: int,
    seed: int = 0,
    slope: float = 1.0,
    river_noise: float = 1.0,
) -> dict:
    """Per-seed §f statistics at x = ληT (T = round(x/(ηλ)) steps), from stationarity:

    ``decay``: Var(v) after a linear decay η(1 − t/T) over T steps, in units of V (mean over m identical
    valley coordinates); ``average``: Var of the uniform average of the next T iterates at constant η, in
    units of V; ``advance``: river progress during the decay; ``lag``: u_last − ū of the average.

    The burn-in from θ_0 = 0 to stationarity takes the exact path (one AR(1) jump; §a itself is validated on
    the step path); the decay and the average then run real SGD steps from that same state.
    """
    steps, burn, sched = decay_plan(x, lr, curvature)
    V = float(theory.stationary_variance(lr, curvature))
    land = QuadraticRiverValley(slope=slope, curvatures=[curvature] * m)
    noise = dict(noise=1.0, river_noise=river_noise, **_NOISE.get())
    out = []
    for j, c in enumerate(_chunks(seeds, land.dim)):
        base = (seed * 1009 + j) * 7919
        start = simulate(land, steps=burn, lr=lr, seeds=c, init="zero", exact=True, seed=base, **noise).final
        end = simulate(land, steps=steps, lr=sched, seeds=c, init=start, seed=base + 1, **noise).final
        decay = (land.valley_coordinates(end).numpy() ** 2).mean(1) / V
        advance = (land.river_coordinate(end) - land.river_coordinate(start)).numpy()
        # the dense average, accumulated over slices of time so memory stays bounded for any T
        theta, total, done, i = start, np.zeros(start.shape), 0, 1
        part = max(1, min(steps, _CHUNK_ELEMENTS // (c * land.dim)))
        while done < steps:
            n = min(part, steps - done)
            i += 1
            res = simulate(
                land, steps=n, lr=lr, seeds=c, init=theta, ckpt_every=1, ckpt_from=1, seed=base + i, **noise
            )
            total += res.checkpoints.numpy().sum(1)
            theta, done = res.final, done + n
        mean = torch.from_numpy(total / steps)
        average = (land.valley_coordinates(mean).numpy() ** 2).mean(1) / V
        lag = (land.river_coordinate(theta) - land.river_coordinate(mean)).numpy()
        out.append(np.stack([decay, advance, average, lag], axis=1))
    vals = np.concatenate(out, axis=0)
    return {
        "decay": vals[:, 0],
        "advance": vals[:, 1],
        "average": vals[:, 2],
        "lag": vals[:, 3],
        "steps": steps,
    }
