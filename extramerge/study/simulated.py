"""A simulated evaluator for the study: trajectories from ``rivervalley.simulate`` with document noise.

The study's calibration-half decision (:func:`extramerge.study.choose.choose`) only asks an evaluator for
``measure(w, half) -> DocLosses``. This module supplies one whose truth is known exactly, so that what the
study ships (the ΔL of a weight vector and its interval, α*, the recommendation, the theory's pick and its
gate) can be scored against the *population* loss.

Trajectory: plain SGD with additive Gaussian gradient noise σ on a river-valley landscape, under a constant,
cosine or WSD schedule, ``n`` checkpoints every ``spacing`` steps after a burn-in (``rivervalley.simulate``,
one call for every seed of a scenario). Three rivers:

- ``straight``: :class:`~rivervalley.landscapes.QuadraticRiverValley`, L = −c·u + ½ Σ λ_i v_i², two valley
  groups (steep and slow; the estimator's own form);
- ``curved``: the same with a river curvature μ (L = −c·u + (μ/2)u², THEORY §d): μ is set so that the
  river's pull falls by e over the checkpoints' learning-rate area, and the river starts where the pull at
  the first checkpoint is c (the curved-river transient that extrapolation can exploit);
- ``bending``: a :class:`~rivervalley.landscapes.SineRiver` (floor y = a·sin(x/ℓ)) whose checkpoints span
  the bend at the top of the sine, times the same valley directions (a quadratic part with no slope): a
  straight line through the checkpoints leaves the floor when extrapolated.

Documents: each half holds its own ``docs`` documents; document k has tokens n_k (log-normal, drawn once),
its own river slope offset a_k ~ N(0, τ_u²), its own valley centre δ_k ~ N(0, τ_v²) per valley coordinate
and a difficulty b_k. Its per-token loss at θ is

    ℓ_k(θ) = L0 + b_k + L(θ) + a_k·u(θ) + ½ Σ_i λ_i [(v_i(θ) − δ_ki)² − v_i(θ)²]

(L the landscape's loss, u its river coordinate, v its valley coordinates, λ their curvatures), and
``measure`` returns nll_k = n_k · ℓ_k(Σ_j w_j θ_j) exactly. Over the document population (E a = E δ = 0)
the loss is L(θ) plus a constant, so the exact population ΔL of a merge is L(θ_w) − L(θ_N)
(:meth:`SimulatedRun.population_delta`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rivervalley import estimate as est
from rivervalley import schedules

from .evaluator import DocLosses

__all__ = ["SimSpec", "SimulatedRun", "simulate_runs", "RIVERS", "SCHEDULES"]

RIVERS = ("straight", "curved", "bending")
SCHEDULES = ("constant", "cosine", "wsd")


@dataclass(frozen=True)
class SimSpec:
    """One scenario. Loss scales are chosen to resemble the LM runs: valley loss of the newest checkpoint
    ≈ 0.05 nats spread over many directions (a smooth loss curve), river drift ≈ 0.0013 (spacing 8) to
    0.005 (spacing 32) nats per checkpoint at the peak learning rate, paired s.e. of close merges ≈
    0.001–0.003 with 400 documents per half."""

    schedule: str = "constant"  # constant, cosine (to 10% of the peak), wsd (linear decay to 0)
    spacing: int = 8  # steps between checkpoints
    river: str = "straight"  # straight, curved, bending
    n: int = 16  # checkpoints
    lr: float = 0.05  # peak learning rate
    noise: float = 0.09  # σ of the additive gradient noise across the valley
    river_noise: float = 0.056  # σ_u along the river (= c: the drift beats it from ~4 steps on)
    slope: float = 0.056  # c
    steep: float = 4.0  # λ of the steep valley group
    slow: float = 0.4  # λ of the slow group
    m: int = 512  # valley directions (half steep, half slow): many, so the loss curve is smooth
    burn_in: int = 400  # steps before the first checkpoint (20 relaxation times of the slow group)
    docs: int = 400  # documents per half
    tokens: float = 400.0  # mean tokens per document (log-normal, σ_log = 0.8)
    river_tau: float = 0.06  # τ_u: sd of the documents' river-slope offsets
    valley_tau: float = 0.045  # τ_v: sd of the documents' valley centres
    length: float = 2.0  # bending river: ℓ, in units of the river's progress over 15 intervals of 32 steps
    bend: float = 1.5  # bending river: a/ℓ (the floor's steepest slope; ≤ 2 keeps SGD stable)

    @property
    def name(self) -> str:
        return f"{self.schedule} s={self.spacing} {self.river}"

    @property
    def steps(self) -> int:
        return self.burn_in + (self.n - 1) * self.spacing

    def schedule_fn(self) -> schedules.Schedule:
        total, span = self.steps, (self.n - 1) * self.spacing
        if self.schedule == "constant":
            return schedules.constant(self.lr)
        if self.schedule == "cosine":  # the checkpoints cover the last part of a cosine to 10% of the peak
            return schedules.cosine(self.lr, total, final_lr=0.1 * self.lr)
        if self.schedule == "wsd":  # constant, then a linear decay to 0 over the checkpoints (+ half a gap)
            return schedules.wsd(self.lr, total, decay_steps=span + self.spacing // 2)
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


class _Loss:
    """(L, u, v) of a batch of parameters [S, p] and the valley curvatures λ of v."""

    def __init__(self, spec: SimSpec):
        from rivervalley.landscapes import QuadraticRiverValley, SineRiver

        h = spec.m // 2
        lam = np.r_[np.full(h, spec.steep), np.full(spec.m - h, spec.slow)]
        self.spec = spec
        eta = np.asarray(spec.schedule_fn()(np.arange(spec.steps + 1)), dtype=float)
        first = spec.burn_in
        win = float(eta[first : spec.steps].sum())  # learning-rate area over the checkpoints
        if spec.river == "bending":
            # valley: the sine's own (steep) direction + the quadratic part's m − 1 directions
            self.sine = SineRiver(
                slope=spec.slope,
                valley_curvature=spec.steep,
                amplitude=spec.bend * spec.length * spec.slope * spec.lr * 15 * 32,
                length=spec.length * spec.slope * spec.lr * 15 * 32,
            )
            self.quad = QuadraticRiverValley(slope=0.0, curvatures=lam[1:])
            self.lam = lam
            # the crest x = πℓ/2 where half the checkpoints' lr area is done: back to step 0 along the
            # floor's gradient flow, dx/dA = c / (1 + (a/ℓ)² cos²(x/ℓ))
            cum = np.cumsum(eta[first : spec.steps])
            mid = first + int(np.searchsorted(cum, 0.5 * win))
            x, k = 0.5 * math.pi * self.sine.length, spec.bend
            for t in range(mid - 1, -1, -1):
                x -= eta[t] * spec.slope / (1 + (k * math.cos(x / self.sine.length)) ** 2)
            self.start = np.r_[self.sine.floor(torch.tensor([x])).numpy()[0], np.zeros(spec.m)]
        elif spec.river in ("straight", "curved"):
            mu = 1.0 / win if spec.river == "curved" else 0.0
            self.quad = QuadraticRiverValley(slope=spec.slope, river_curvature=mu, curvatures=lam)
            self.sine, self.lam = None, lam
            u0 = 0.0
            if mu > 0:  # the pull c − μu equals c at the first checkpoint: e_first = c/μ
                decay = float(np.prod(1 - eta[:first] * mu))
                u0 = spec.slope / mu - spec.slope / mu / decay
            self.start = np.r_[u0, np.zeros(spec.m)]
        else:
            raise ValueError(f"river must be one of {RIVERS}, got {spec.river!r}")

    @property
    def dim(self) -> int:
        return self.start.size

    def __call__(self, theta: torch.Tensor):
        theta = torch.as_tensor(theta, dtype=torch.float64)
        if self.sine is None:
            q = self.quad
            return q.loss(theta), q.river_coordinate(theta), q.valley_coordinates(theta)
        a, b = theta[:, :2], theta[:, 2:]
        L = self.sine.loss(a) + self.quad.loss(b)
        v = torch.cat([self.sine.valley_coordinates(a), self.quad.valley_coordinates(b)], dim=1)
        return L, self.sine.river_coordinate(a), v

    def simulate(self, seeds: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
        """Checkpoints [S, n, p] (both parts share one schedule and noise level) and their steps."""
        from rivervalley.simulate import simulate

        sp = self.spec
        kw = dict(
            steps=sp.steps,
            lr=sp.schedule_fn(),
            seeds=seeds,
            noise=sp.noise,
            river_noise=sp.river_noise,
            ckpt_every=sp.spacing,
            ckpt_from=sp.burn_in,
        )
        if self.sine is None:
            r = simulate(self.quad, init=torch.as_tensor(self.start), seed=seed, **kw)
            return r.checkpoints, np.asarray(r.ckpt_steps)
        a = simulate(self.sine, init=torch.as_tensor(self.start[:2]), seed=seed, **kw)
        kw["river_noise"] = 0.0  # the quadratic part's river coordinate has no slope and stays at 0
        b = simulate(self.quad, init=torch.zeros(self.spec.m), seed=seed + 7919, **kw)
        return torch.cat([a.checkpoints, b.checkpoints], dim=2), np.asarray(a.ckpt_steps)


@dataclass
class _Half:
    tokens: np.ndarray  # [D]
    a: np.ndarray  # [D] river-slope offsets
    delta: np.ndarray  # [D, m] valley centres
    const: np.ndarray  # [D] L0 + b_k + ½ Σ λ δ²

    @classmethod
    def draw(cls, spec: SimSpec, lam: np.ndarray, rng: np.random.Generator) -> _Half:
        D = spec.docs
        tok = np.maximum(1, np.round(rng.lognormal(math.log(spec.tokens) - 0.32, 0.8, D)))
        delta = rng.normal(0.0, spec.valley_tau, (D, lam.size))
        const = 3.0 + rng.normal(0.0, 0.5, D) + 0.5 * (delta**2) @ lam
        return cls(tok.astype(float), rng.normal(0.0, spec.river_tau, D), delta, const)


class SimulatedRun:
    """One simulated run: its checkpoints, grid, two halves of documents, and the exact losses.

    ``measure(w, half)`` is the study's evaluator interface; ``population_loss(w)`` and
    ``population_delta(w, base=None)`` (default base: the newest checkpoint) are the truth."""

    def __init__(self, spec: SimSpec, loss: _Loss, ckpts: torch.Tensor, steps: np.ndarray, rng):
        self.spec, self._loss = spec, loss
        self.checkpoints = ckpts.to(torch.float64)  # [n, p]
        self.ckpt_steps = steps
        self.lam = loss.lam
        self.halves = {h: _Half.draw(spec, loss.lam, rng) for h in ("calib", "test")}
        self.calls = 0
        self._memo: dict = {}

    @property
    def n(self) -> int:
        return self.checkpoints.shape[0]

    def grid(self) -> est.Grid:
        return est.Grid.from_schedule(self.ckpt_steps, self.spec.schedule_fn())

    def merged(self, w) -> torch.Tensor:
        w = torch.as_tensor(np.asarray(w, dtype=np.float64))
        return (w @ self.checkpoints)[None]

    def population_loss(self, w) -> float:
        """The landscape's loss at Σ w_j θ_j (the population loss up to a constant shared by all merges)."""
        return float(self._loss(self.merged(w))[0][0])

    def population_losses(self, weights) -> np.ndarray:
        """``population_loss`` of each row of ``weights`` [k, n], in one batched call."""
        th = torch.as_tensor(np.asarray(weights, dtype=np.float64)) @ self.checkpoints
        return self._loss(th)[0].numpy()

    def population_delta(self, w, base=None) -> float:
        base = np.eye(self.n)[-1] if base is None else base
        return self.population_loss(w) - self.population_loss(base)

    def doc_loss(self, w, half: str) -> np.ndarray:
        """ℓ_k(Σ w_j θ_j) of every document of a half (per token)."""
        L, u, v = (x.numpy()[0] for x in self._loss(self.merged(w)))
        d = self.halves[half]
        return d.const + float(L) + d.a * float(u) - d.delta @ (self.lam * v)

    def measure(self, w, half: str) -> DocLosses:
        key = (np.asarray(w, dtype=np.float64).tobytes(), half)
        if key not in self._memo:
            if half not in self.halves:
                raise ValueError(f"half must be 'calib' or 'test', got {half!r}")
            self.calls += 1
            tok = self.halves[half].tokens
            self._memo[key] = DocLosses(tok * self.doc_loss(w, half), tok.copy())
        return self._memo[key]

    def describe(self) -> dict:
        return {**asdict(self.spec), "name": self.spec.name, "dim": self._loss.dim}


def simulate_runs(spec: SimSpec, seeds: int, seed: int = 0) -> list[SimulatedRun]:
    """``seeds`` independent runs of one scenario (one simulator call); each gets its own documents."""
    loss = _Loss(spec)
    ck, steps = loss.simulate(seeds, seed)
    rng = np.random.default_rng([seed, 20250])
    return [SimulatedRun(spec, loss, ck[i], steps, rng) for i in range(seeds)]
