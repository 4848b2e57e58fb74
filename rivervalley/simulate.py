"""Simulate an optimizer on a landscape for S seeds at once and keep checkpoints (THEORY.md, "The toy model").

:func:`simulate` runs the step path (one batched optimizer step per iteration, no loop over seeds) or, for
SGD on a quadratic with a constant learning rate, the exact fast path that jumps from checkpoint to
checkpoint with the closed-form AR(1) transition of every eigen-coordinate.

Gradient noise (``noise`` = σ, ``river_noise`` = σ_u, default σ):

- ``'additive'``: g̃ = ∇L + n with n Gaussian; for the quadratics n has std σ_u on the river and σ on every
  valley eigen-coordinate (THEORY: v_{t+1} = (1 − ηλ)v_t + ησξ_t). With ``rotate=True`` and σ_u = σ this is
  isotropic noise in parameter space (the rotation leaves it unchanged). On the 2-D curved rivers the noise
  is isotropic σ with its component along the local river tangent rescaled to σ_u.
- ``'minibatch'``: noise covariance proportional to the curvature: valley eigen-coordinate i gets std
  σ·√λ_i (covariance σ²H, as for minibatch gradients of a least-squares loss), the river keeps σ_u. On the
  curved rivers the valley std is σ·√(λ|∇v|²), the local curvature across the floor.

Checkpoints: steps ``ckpt_from, ckpt_from + ckpt_every, ...`` up to ``steps``. Step k means θ_k, the
parameters after k updates, so ``ckpt_from=0`` includes the initial point θ_0. Ask for N checkpoints with
``n_ckpts`` (with ``ckpt_every``; ``steps`` then defaults to ``ckpt_from + (N − 1)·ckpt_every``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _native
from .compute import flush_denormals
from .landscapes import Landscape, QuadraticRiverValley, _EigenQuadratic
from .memory import require_memory
from .optimizers import SGD
from .schedules import Schedule, as_schedule

__all__ = ["SimResult", "simulate", "checkpoint_steps", "exact_transition"]

INITS = ("zero", "stationary")
NOISE_BACKENDS = ("auto", "native", "torch")


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    ``checkpoints`` [S, N, p] and ``final`` [S, p] are torch tensors; ``ckpt_steps`` [N] (int64) says which
    step each checkpoint is; ``ckpt_loss`` [S, N] (computed on first access); ``loss_curve`` [n] is the
    seed-mean loss at ``loss_steps`` [n] (None unless ``record_loss_every`` was given).
    """

    checkpoints: torch.Tensor
    ckpt_steps: np.ndarray
    final: torch.Tensor
    steps: int
    landscape: Landscape
    loss_curve: np.ndarray | None = None
    loss_steps: np.ndarray | None = None
    config: dict = field(default_factory=dict)
    _ckpt_loss: torch.Tensor | None = field(default=None, repr=False)

    @property
    def ckpt_loss(self) -> torch.Tensor:
        """Loss of every checkpoint, [S, N] (one checkpoint at a time, to bound temporary memory)."""
        if self._ckpt_loss is None:
            s, n, _ = self.checkpoints.shape
            out = torch.empty(s, n, dtype=self.checkpoints.dtype, device=self.checkpoints.device)
            for k in range(n):
                out[:, k] = self.landscape.loss(self.checkpoints[:, k])
            self._ckpt_loss = out
        return self._ckpt_loss

    @property
    def seeds(self) -> int:
        return self.checkpoints.shape[0]

    @property
    def n_ckpts(self) -> int:
        return self.checkpoints.shape[1]

    def u(self) -> torch.Tensor:
        """River coordinate of every checkpoint, [S, N]."""
        s, n, p = self.checkpoints.shape
        return self.landscape.river_coordinate(self.checkpoints.reshape(s * n, p)).reshape(s, n)

    def v(self) -> torch.Tensor:
        """Valley coordinates of every checkpoint, [S, N, m]."""
        s, n, p = self.checkpoints.shape
        return self.landscape.valley_coordinates(self.checkpoints.reshape(s * n, p)).reshape(s, n, -1)


# --------------------------------------------------------------------------------------------------
# argument checks


def _int_at_least(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _nonneg_float(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def checkpoint_steps(
    steps: int | None = None, *, ckpt_every: int | None = None, n_ckpts: int | None = None, ckpt_from: int = 0
) -> tuple[int, np.ndarray]:
    """Resolve the checkpoint plan: returns ``(steps, ckpt_steps)``.

    - ``ckpt_every`` only: ``ckpt_from, ckpt_from + ckpt_every, ... <= steps``;
    - ``ckpt_every`` and ``n_ckpts``: exactly N checkpoints from ``ckpt_from`` (``steps`` defaults to the
      last one and must not be smaller);
    - ``n_ckpts`` only: ``ckpt_every = (steps − ckpt_from) // (n_ckpts − 1)``;
    - neither: no checkpoints.
    """
    ckpt_from = _int_at_least("ckpt_from", ckpt_from, 0)
    if ckpt_every is not None:
        ckpt_every = _int_at_least("ckpt_every", ckpt_every, 1)
    if n_ckpts is not None:
        n_ckpts = _int_at_least("n_ckpts", n_ckpts, 1)
    if steps is None:
        if ckpt_every is None or n_ckpts is None:
            raise ValueError("steps is required unless both ckpt_every and n_ckpts are given")
        steps = ckpt_from + (n_ckpts - 1) * ckpt_every
    steps = _int_at_least("steps", steps, 0)
    if ckpt_every is None and n_ckpts is None:
        return steps, np.zeros(0, dtype=np.int64)
    if ckpt_from > steps:
        raise ValueError(f"ckpt_from must be in [0, steps={steps}], got {ckpt_from}")
    if ckpt_every is None:
        if n_ckpts == 1:
            return steps, np.array([ckpt_from], dtype=np.int64)
        ckpt_every = (steps - ckpt_from) // (n_ckpts - 1)
        if ckpt_every < 1:
            raise ValueError(f"n_ckpts={n_ckpts} checkpoints do not fit in steps {ckpt_from}..{steps}")
    if n_ckpts is None:
        return steps, np.arange(ckpt_from, steps + 1, ckpt_every, dtype=np.int64)
    last = ckpt_from + (n_ckpts - 1) * ckpt_every
    if last > steps:
        raise ValueError(
            f"n_ckpts={n_ckpts} checkpoints every {ckpt_every} from {ckpt_from} end at step "
            f"{last} > steps={steps}"
        )
    return steps, ckpt_from + ckpt_every * np.arange(n_ckpts, dtype=np.int64)


def _lr_array(lr, steps: int) -> tuple[np.ndarray, Callable]:
    sched = as_schedule(lr)
    if isinstance(sched, Schedule):
        lrs = np.asarray(sched(np.arange(max(steps, 1))), dtype=np.float64)
    else:
        lrs = np.array([float(sched(t)) for t in range(max(steps, 1))], dtype=np.float64)
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError("lr must be finite and >= 0 at every step (got NaN, inf or a negative value)")
    return lrs, sched


def _is_constant_lr(sched) -> bool:
    return isinstance(sched, Schedule) and sched.is_constant


# --------------------------------------------------------------------------------------------------
# exact AR(1) transitions


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


def exact_transition(landscape: _EigenQuadratic, lr: float, s: int, sigma_eigen: np.ndarray):
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


# --------------------------------------------------------------------------------------------------
# initial point


def _initial_theta(
    landscape, init, s_count, lr0, noise, river_noise, noise_kind, river_start, gen, device, dtype
):
    p = landscape.dim
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} or a tensor, got {init!r}")
        if init == "zero":
            if river_start is not None:
                raise ValueError("river_start is only used with init='stationary'")
            return torch.zeros(s_count, p, dtype=dtype, device=device)
        if not isinstance(landscape, _EigenQuadratic):
            raise ValueError(f"init='stationary' needs a quadratic landscape, got {type(landscape).__name__}")
        try:
            var = landscape.stationary_variance(lr0, noise, river_noise, noise_kind)
        except ValueError as e:
            raise ValueError(f"init='stationary' needs lr*curvature in (0, 2): {e}") from None
        if not np.all(np.isfinite(var[1:])):
            raise ValueError("init='stationary' needs every valley curvature > 0")
        mu = landscape.river_curvature
        if river_start is None:
            river_start = landscape.river_optimum if mu > 0 else 0.0
        river_start = float(river_start)
        if not math.isfinite(river_start):
            raise ValueError(f"river_start must be finite, got {river_start}")
        std = np.sqrt(np.where(np.isfinite(var), var, 0.0))
        z = torch.randn(s_count, p, generator=gen, dtype=dtype, device=device)
        z.mul_(torch.as_tensor(std, dtype=dtype, device=device))
        z[:, 0] += river_start
        return landscape.from_eigen(z).contiguous()
    if river_start is not None:
        raise ValueError("river_start is only used with init='stationary'")
    theta0 = torch.as_tensor(init).detach().to(dtype=dtype, device=device)
    if theta0.ndim == 1:
        theta0 = theta0.expand(s_count, -1)
    if theta0.shape != (s_count, p):
        raise ValueError(f"init must have shape [{p}] or [{s_count}, {p}], got {tuple(theta0.shape)}")
    if not torch.isfinite(theta0).all():
        raise ValueError("init must be finite (got NaN or inf)")
    return theta0.clone().contiguous()


# --------------------------------------------------------------------------------------------------
# Gaussian draws


def _resolve_backend(backend: str, device: torch.device, dtype, noise_dtype) -> str:
    """'native' or 'torch' for ``noise_backend`` (see :func:`simulate`)."""
    if backend not in NOISE_BACKENDS:
        raise ValueError(f"noise_backend must be one of {NOISE_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type != "cpu":
        why = f"it runs on CPU only (device {device})"
    elif dtype not in _native.PhiloxNormals.DTYPES:
        why = f"it updates float32/float64 parameters only (dtype {dtype})"
    elif noise_dtype != torch.float32:
        why = f"it draws float32 normals (noise_dtype {noise_dtype} needs noise_backend='torch')"
    elif _native.load() is None:
        why = _native.status()["detail"]
    else:
        return "native"
    if backend == "native":
        raise ValueError(f"noise_backend='native' is unavailable: {why}")
    return "torch"


class _NoiseSource:
    """Standard normals for a [S, p] batch.

    ``backend='native'``: the compiled Philox4x32-10 + Box-Muller kernel (:mod:`rivervalley._native`);
    its fused updates (``self.native``: SGD steps, AR(1) jumps) draw the normals in registers, so they
    never touch memory, and :meth:`draw` gives them as a tensor for everything else.

    ``backend='torch'``: drawn in ``dtype`` by ``streams`` independent torch generators on contiguous row
    blocks (seeds derived from ``seed``) and delivered in ``out_dtype``.

    Drawing float32 and converting (a vectorised copy) is several times faster than torch's float64
    sampler and keeps every later update same-dtype (mixed-dtype CPU kernels are slow). For large batches
    the blocks are filled by background threads (torch.randn releases the GIL) into two alternating
    buffers, so the next step's noise is drawn while the current step computes. The numbers depend on
    (seed, S, p, streams) only, never on the thread count or on prefetching. A returned buffer stays valid
    until the next call.
    """

    def __init__(
        self, shape, seed: int, dtype, device, out_dtype=None, streams: int = 4, threads=None, backend="torch"
    ):
        base = torch.Generator().manual_seed(int(seed))
        init_seed = int(torch.randint(0, 2**62, (1,), generator=base))
        self.init_gen = torch.Generator(device=device).manual_seed(init_seed)
        out_dtype = dtype if out_dtype is None else out_dtype
        self.backend = backend
        self.pool = self.native = None
        if backend == "native":
            key = int(torch.randint(0, 2**62, (1,), generator=base))
            self.native = _native.PhiloxNormals(key, threads)
            self.shape, self.out_dtype, self.device, self.buf = shape, out_dtype, device, None
            return
        numel = math.prod(shape)
        big = numel >= 1 << 17 and torch.device(device).type == "cpu"
        workers = min(streams, os.cpu_count() or 1) if threads is None else int(threads)
        self.pool = ThreadPoolExecutor(max(1, workers)) if big else None
        self.sets = []
        for _ in range(2 if big else 1):
            raw = torch.empty(shape, dtype=dtype, device=device)
            out = raw if out_dtype == dtype else torch.empty(shape, dtype=out_dtype, device=device)
            blocks = [
                (r, o) for r, o in zip(raw.chunk(streams, 0), out.chunk(streams, 0), strict=True) if r.numel()
            ]
            self.sets.append((out, blocks))
        seeds = torch.randint(0, 2**62, (len(self.sets[0][1]),), generator=base).tolist()
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self._next = 0
        self._pending = None

    @staticmethod
    def _fill(block, gen) -> None:
        raw, out = block
        torch.randn(raw.shape, generator=gen, dtype=raw.dtype, device=raw.device, out=raw)
        if out is not raw:
            out.copy_(raw)

    def _submit(self, k: int):
        blocks = self.sets[k][1]
        return [self.pool.submit(self._fill, b, g) for b, g in zip(blocks, self.gens, strict=True)]

    def draw(self) -> torch.Tensor:
        """Fresh standard normals, [S, p] in ``out_dtype``."""
        if self.native is not None:
            if self.buf is None:
                self.buf = torch.empty(self.shape, dtype=self.out_dtype, device=self.device)
            return self.native.fill(self.buf)
        if self.pool is None:
            out, blocks = self.sets[0]
            for block, gen in zip(blocks, self.gens, strict=True):
                self._fill(block, gen)
            return out
        ready = self._next
        pending = self._pending if self._pending is not None else self._submit(ready)
        for f in pending:
            f.result()
        self._next = 1 - ready
        self._pending = self._submit(self._next)  # prefetch the next draw while the caller computes
        return self.sets[ready][0]

    def close(self) -> None:
        if self.native is not None:
            self.native.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
            self._pending = None


# --------------------------------------------------------------------------------------------------
# the simulator


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
    s_count = _int_at_least("seeds", seeds, 1)
    noise = _nonneg_float("noise", noise)
    river_noise = None if river_noise is None else _nonneg_float("river_noise", river_noise)
    steps, ckpts = checkpoint_steps(steps, ckpt_every=ckpt_every, n_ckpts=n_ckpts, ckpt_from=ckpt_from)
    if record_loss_every is not None:
        record_loss_every = _int_at_least("record_loss_every", record_loss_every, 1)
    lrs, sched = _lr_array(lr, steps)
    device = torch.device(device)
    landscape = landscape.to(device, dtype)
    noise_fn = landscape._make_noise(noise, river_noise, noise_kind)  # validates noise_kind
    if exact:
        _check_exact(landscape, optimizer, sched, record_loss_every)
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

    if noise_threads is not None:
        noise_threads = _int_at_least("noise_threads", noise_threads, 1)
    backend = _resolve_backend(noise_backend, device, dtype, noise_dtype)
    config["noise_backend"] = backend
    ckpt_shape = (s_count, len(ckpts), landscape.dim)
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != ckpt_shape:
            raise ValueError(f"out must be a tensor of shape {list(ckpt_shape)} (seeds, checkpoints, dim)")
        same_device = out.device.type == device.type and (
            device.index is None or out.device.index == device.index
        )
        if out.dtype != dtype or not same_device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor on {device}")
    source = _NoiseSource(
        (s_count, landscape.dim),
        seed,
        noise_dtype,
        device,
        out_dtype=dtype,
        threads=noise_threads,
        backend=backend,
    )
    try:
        theta = _initial_theta(
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
        if out is None and device.type == "cpu":
            _check_memory(ckpt_shape, dtype)
        ckpt_tensor = torch.empty(ckpt_shape, dtype=dtype, device=device) if out is None else out
        with flush_denormals(), torch.no_grad():
            if exact:
                theta = _run_exact(
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
                theta, loss_steps, loss_curve = _run_steps(
                    landscape,
                    optimizer,
                    theta,
                    lrs,
                    steps,
                    ckpts,
                    ckpt_tensor,
                    noise_fn,
                    landscape.noise_std(noise, river_noise, noise_kind)
                    if isinstance(landscape, _EigenQuadratic)
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


def _check_memory(ckpt_shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Refuse a run whose checkpoints (plus a few [S, p] working buffers) do not fit in available memory."""
    s, n, p = ckpt_shape
    item = torch.empty((), dtype=dtype).element_size()
    need = item * s * p * (n + 8)  # checkpoints, θ, gradient, optimizer state, noise draws
    require_memory(
        need,
        f"simulate with {s} seeds x {n} checkpoints x {p} parameters ({dtype}, checkpoints "
        f"{item * s * n * p / 1e9:.3g} GB; fewer seeds or checkpoints need less)",
    )


def _check_exact(landscape, optimizer, sched, record_loss_every) -> None:
    if not isinstance(landscape, _EigenQuadratic):
        raise ValueError(f"exact=True needs a quadratic landscape, got {type(landscape).__name__}")
    if not (isinstance(optimizer, SGD) and optimizer.is_plain):
        raise ValueError(f"exact=True needs plain SGD (no momentum, no weight decay), got {optimizer!r}")
    if not _is_constant_lr(sched):
        raise ValueError("exact=True needs a constant lr (a float or schedules.constant)")
    if record_loss_every is not None:
        raise ValueError("record_loss_every is not available with exact=True (it skips the steps in between)")


def _run_exact(landscape, theta, lr, steps, ckpts, ckpt_tensor, sigma, source):
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


def _run_steps(
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
        h = landscape._h
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
            g = landscape._grad_into(theta, gbuf)
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
    h = landscape._h
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
