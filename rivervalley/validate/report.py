"""The validation table's data types: a :class:`Row` (formula against a seed mean ± standard error and its z),
a :class:`Study` (rows sharing one simulation), a :class:`Report` and its text table."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["Z_MAX", "Row", "Study", "Report", "format_table"]

Z_MAX = 4.0


@dataclass
class Row:
    """One check: ``formula`` against the seed mean ``mean`` ± ``se`` of a per-seed statistic."""

    section: str
    quantity: str
    scenario: str
    formula: float
    check: str = "="  # "=" exact (two-sided), "≥" lower bound (one-sided), "≈" approximation (not gated)
    note: str = ""
    mean: float = math.nan
    se: float = math.nan
    seeds: int = 0
    study: str = ""
    path: str = ""

    def __post_init__(self):
        self.formula = float(self.formula)

    @property
    def z(self) -> float:
        if not (math.isfinite(self.mean) and self.se > 0):
            return math.nan
        return float((self.mean - self.formula) / self.se)

    @property
    def gated(self) -> bool:
        return self.check in ("=", "≥")

    @property
    def passed(self) -> bool:
        """Exact rows need |z| ≤ 4, bounds z ≥ −4; approximations always pass (they are reported)."""
        z = self.z
        if self.check == "=":
            return bool(math.isfinite(z) and abs(z) <= Z_MAX)
        if self.check == "≥":
            return bool(math.isfinite(z) and z >= -Z_MAX)
        return True

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(z=self.z, gated=self.gated, passed=self.passed)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class Study:
    """Rows that share one simulation; ``measure(seeds, seed)`` returns per-seed statistics [seeds, rows]."""

    name: str
    path: str  # "step" or "exact": which simulator path measure() uses
    rows: list[Row]
    measure: Callable[[int, int], np.ndarray]
    seeds: int


@dataclass
class Report:
    rows: list[Row]
    fast: bool
    seed: int
    wall_s: float
    timings: dict = field(default_factory=dict)
    noise_backend: str = "torch"

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_z(self) -> float:
        zs = [abs(r.z) for r in self.rows if r.check == "=" and math.isfinite(r.z)]
        return max(zs, default=math.nan)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "fast": self.fast,
            "seed": self.seed,
            "noise_backend": self.noise_backend,
            "z_max": Z_MAX,
            "n_rows": len(self.rows),
            "n_gated": sum(r.gated for r in self.rows),
            "n_failed": len(self.failures),
            "max_abs_z_exact": None if math.isnan(self.max_abs_z) else self.max_abs_z,
            "wall_s": self.wall_s,
            "study_seconds": self.timings,
            "rows": [r.to_dict() for r in self.rows],
        }


def format_table(report: Report) -> str:
    """The table as text: section, quantity, scenario, check, formula, simulated mean ± se, z."""
    head = ("§", "quantity", "scenario", "chk", "formula", "simulated ± se", "z", "")
    lines = []
    for r in report.rows:
        flag = "" if r.passed else "FAIL"
        if r.check == "≈":
            flag = f"bias {r.mean - r.formula:+.3g}"
        lines.append(
            (
                r.section,
                r.quantity,
                r.scenario,
                r.check,
                f"{r.formula:.5g}",
                f"{r.mean:.5g} ± {r.se:.2g}",
                f"{r.z:+.2f}",
                flag,
            )
        )
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head).rstrip(), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [fmt.format(*x).rstrip() for x in lines]
    gated = [r for r in report.rows if r.gated]
    out.append(
        f"{len(report.rows)} rows ({len(gated)} gated), {len(report.failures)} failed |z| > {Z_MAX:g}; "
        f"max |z| (exact rows) {report.max_abs_z:.2f}; {report.wall_s:.1f} s"
        + (" (fast)" if report.fast else "")
        + f"; noise backend {report.noise_backend}"
    )
    notes = [r for r in report.rows if r.note and r.check != "≈"]
    for r in notes:
        out.append(f"  note [{r.study}] {r.quantity} @ {r.scenario}: {r.note}")
    return "\n".join(out)
