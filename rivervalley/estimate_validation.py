"""Validate ``rivervalley.estimate`` on simulated trajectories whose parameters are known.

Plain SGD on a quadratic river valley (``QuadraticRiverValley``, linear river of slope c, additive noise σ)
under a constant, cosine or WSD schedule, checkpoints every ``s`` steps. For each seed the exact loss of
every calibration merge is computed from the simulated checkpoints, the model is fitted, and compared with
the truth of THEORY §g:

- river slope per checkpoint interval of learning-rate area: c² · (A_{t_N} − A_{t_1}) / (N − 1);
- expected valley loss of the newest checkpoint: Σ_i λ_i V_i(t_N) / 2 from the exact recursion
  V_{t+1} = (1 − η_tλ_i)² V_t + η_t² σ², started stationary at the first step's learning rate.

Two valley spectra: ``two-group`` (half the directions steep, half slow: the model's own form) and
``power-law`` (λ_i = λ_max · i^−1: a continuum the two groups only approximate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import estimate as est
from . import schedules

__all__ = ["Scenario", "SCENARIOS", "validate_scenario", "table"]


@dataclass(frozen=True)
class Scenario:
    schedule: str  # constant, cosine, wsd
    spacing: int
    spectrum: str  # two-group, power-law
    n: int = 12
    lr: float = 0.05
    m: int = 32

    @property
    def name(self) -> str:
        return f"{self.schedule} s={self.spacing} {self.spectrum}"


SCENARIOS = tuple(
    Scenario(sch, s, spec)
    for spec in ("two-group", "power-law")
    for sch in ("constant", "cosine", "wsd")
    for s in (4, 32)
)


def _setup(sc: Scenario):
    from .landscapes import QuadraticRiverValley

    if sc.spectrum == "two-group":
        lam = np.r_[np.full(sc.m // 2, 4.0), np.full(sc.m - sc.m // 2, 0.4)]
    else:
        lam = 8.0 / np.arange(1, sc.m + 1)
    land = QuadraticRiverValley(slope=1.0, curvatures=lam)
    steps = sc.n * sc.spacing + 200
    ckpt_from = steps - (sc.n - 1) * sc.spacing
    sched = {
        "constant": schedules.constant(sc.lr),
        "cosine": schedules.cosine(sc.lr, steps, final_lr=0.0),
        "wsd": schedules.wsd(sc.lr, steps, decay_steps=(sc.n - 1) * sc.spacing + sc.spacing // 2),
    }[sc.schedule]
    return land, lam, steps, ckpt_from, sched


def validate_scenario(sc: Scenario, seeds: int = 60, seed: int = 0) -> dict:
    import torch

    from .simulate import simulate

    land, lam, steps, ckpt_from, sched = _setup(sc)
    r = simulate(
        land,
        steps=steps,
        lr=sched,
        seeds=seeds,
        noise=1.0,
        ckpt_every=sc.spacing,
        ckpt_from=ckpt_from,
        init="stationary",
        seed=seed,
    )
    ck, cs = r.checkpoints, np.asarray(r.ckpt_steps)
    grid = est.Grid.from_schedule(cs, sched)
    cal = est.calibration_weights(sc.n)
    Wm = torch.tensor(np.stack(list(cal.values())), dtype=ck.dtype)
    merged = torch.einsum("kn,snp->skp", Wm, ck)
    L = land.loss(merged.reshape(-1, ck.shape[-1])).reshape(seeds, -1).numpy()
    eta = np.asarray(sched(np.arange(steps)), dtype=float)
    V = eta[0] / (lam * (2 - eta[0] * lam))
    for t in range(cs[-1]):
        V = (1 - eta[t] * lam) ** 2 * V + eta[t] ** 2
    valley_true = float((lam * V / 2).sum())
    area = np.concatenate([[0.0], np.cumsum(eta)])
    slope_true = float((area[cs[-1]] - area[cs[0]]) / (sc.n - 1))  # c = 1
    rows = []
    for i in range(seeds):
        f = est.fit(list(cal.values()), L[i], grid)
        s, v = f.slope, f.valley_loss
        rows.append(
            (s.value, s.lo <= slope_true <= s.hi, v.value, v.lo <= valley_true <= v.hi, f.rho_identified)
        )
    a = np.array(rows, dtype=float)
    return {
        **asdict(sc),
        "name": sc.name,
        "seeds": seeds,
        "slope_true": slope_true,
        "slope_median": float(np.median(a[:, 0])),
        "slope_rel_error": float(np.median(a[:, 0]) / slope_true - 1),
        "slope_coverage": float(a[:, 1].mean()),
        "valley_true": valley_true,
        "valley_median": float(np.median(a[:, 2])),
        "valley_rel_error": float(np.median(a[:, 2]) / valley_true - 1),
        "valley_coverage": float(a[:, 3].mean()),
        "rho_identified": float(a[:, 4].mean()),
    }


def table(rows: list[dict]) -> str:
    out = [
        "| scenario | slope: true | median error | 90% coverage | valley loss: true | median error "
        "| 90% coverage | ρ identified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['slope_true']:.4g} | {r['slope_rel_error']:+.1%} | "
            f"{r['slope_coverage']:.0%} | "
            f"{r['valley_true']:.4g} | {r['valley_rel_error']:+.1%} | {r['valley_coverage']:.0%} | "
            f"{r['rho_identified']:.0%} |"
        )
    return "\n".join(out)
