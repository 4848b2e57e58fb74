"""What to keep online, as data: ``Average`` items and the one grammar that spells them
(``--online-merge``, the HF callback, the Python API).

Grammar: items separated by commas, each ``KIND:VALUE``::

    ema:BETA       exponential moving average, decay β in [0, 1) (torch's AveragedModel EMA)
    pema:GAMMA     power-function EMA (Karras et al. 2024, EDM2): β_t = (1 − 1/t)^(γ+1), γ > 0
    sma:K          uniform average of the last K snapshots
    wma:K          the last K snapshots weighted 1..K (newest heaviest)
    extra:ALPHA@D  Extra-Merge E_t = M_t + α (M_t − M_{t−d}) of the nearest sma/wma/ema/pema item
                   before it (M_{t−d}: that average d updates earlier)

e.g. ``ema:0.99,sma:8,extra:0.5@4`` (the extrapolation of sma:8). Names (the keys of the logs and of the
saved merges) are the kind when it appears once, else kind + value (``ema0.99``, ``extra0.5@4``).
A window with other weights comes from Python: ``Average("sma", 8, weights=...)`` with a vector of length K
(oldest first, as ``rivervalley.weights`` builds them) or a callable ``K -> vector``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["KINDS", "WINDOWED", "Average", "parse_spec", "resolve_names"]

KINDS = ("ema", "pema", "sma", "wma", "extra")
WINDOWED = ("sma", "wma")  # kept as a ring of snapshots; the others are running averages
_BASES = ("ema", "pema", "sma", "wma")


@dataclass
class Average:
    """One merge kept online. ``value``: β (ema), γ (pema), K (sma/wma), α (extra); ``offset``: d (extra);
    ``weights``: a window's own weight vector (length K, oldest first) or ``K -> vector``; ``base``: the
    index, in the list, of the average an extra extrapolates (set by ``resolve_names``)."""

    kind: str
    value: float
    offset: int = 0
    weights: Sequence[float] | Callable | None = None
    name: str | None = None
    base: int | None = None
    text: str = field(default="", repr=False)

    def label(self) -> str:
        v = f"{self.value:g}" if self.kind in ("ema", "pema", "extra") else str(int(self.value))
        return f"{self.kind}{v}" + (f"@{self.offset}" if self.kind == "extra" else "")


def _number(flag: str, item: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{flag}: {item!r}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{flag}: {item!r}: {text!r} is not a finite number")
    return v


def _integer(flag: str, item: str, text: str, lo: int) -> int:
    if not text.strip().isdigit() or int(text) < lo:
        raise ValueError(f"{flag}: {item!r}: {text!r} must be an integer >= {lo}")
    return int(text)


def _item(flag: str, item: str) -> Average:
    kind, sep, rest = item.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        raise ValueError(
            f"{flag}: {item!r} is not KIND:VALUE with KIND one of {', '.join(KINDS)} "
            "(e.g. ema:0.99,sma:8,extra:0.5@4)"
        )
    if kind == "ema":
        beta = _number(flag, item, rest)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{flag}: {item!r}: the EMA decay must lie in [0, 1)")
        return Average("ema", beta, text=item)
    if kind == "pema":
        gamma = _number(flag, item, rest)
        if gamma <= 0:
            raise ValueError(f"{flag}: {item!r}: the power-EMA exponent γ must be > 0")
        return Average("pema", gamma, text=item)
    if kind in WINDOWED:
        return Average(kind, _integer(flag, item, rest, 1), text=item)
    alpha, at, d = rest.partition("@")
    if not at:
        raise ValueError(
            f"{flag}: {item!r}: write extra:ALPHA@D (D: the offset in updates, e.g. extra:0.5@4)"
        )
    return Average("extra", _number(flag, item, alpha), offset=_integer(flag, item, d, 1), text=item)


def parse_spec(text: str, flag: str = "--online-merge") -> list[Average]:
    """``Average`` items of a spec string (see the module docstring), names and bases resolved; a
    ValueError naming ``flag`` and the item at fault otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{flag}: empty; give e.g. ema:0.99,sma:8,extra:0.5@4")
    items = [_item(flag, part.strip()) for part in text.split(",") if part.strip()]
    return resolve_names(items, flag)


def resolve_names(items: Sequence[Average], flag: str = "averages") -> list[Average]:
    """Names (kind, or kind+value when a kind repeats) and the base of each extra (the nearest sma/wma/
    ema/pema before it); refuses an item listed twice, an extra with no base, a bad window vector."""
    items = list(items)
    counts = {k: sum(a.kind == k for a in items) for k in KINDS}
    seen: set[str] = set()
    base = None
    for i, a in enumerate(items):
        if a.kind not in KINDS:
            raise ValueError(f"{flag}: unknown kind {a.kind!r}; expected one of {', '.join(KINDS)}")
        if a.kind == "extra":
            if base is None:
                raise ValueError(
                    f"{flag}: {a.text or a.label()!r} needs an sma:K, wma:K, ema:BETA or pema:GAMMA "
                    "before it (the average it extrapolates)"
                )
            a.base = base
        elif a.kind in _BASES:
            base = i
        if a.kind in WINDOWED:
            a.value = int(a.value)
            if a.value < 1:
                raise ValueError(f"{flag}: {a.kind} window must be >= 1, got {a.value}")
        if a.weights is not None and a.kind != "sma":
            raise ValueError(f"{flag}: {a.label()}: only an sma window takes its own weights")
        a.name = a.name or (a.kind if counts[a.kind] == 1 else a.label())
        if a.name in seen:
            raise ValueError(f"{flag}: {a.name!r} is listed twice")
        seen.add(a.name)
    return items
