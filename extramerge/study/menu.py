"""The study's menu: the merges the recommendation chooses from.

*Plain* candidates need no theory: the newest checkpoint; SMA and WMA over K ∈ {2, 4, 8, all}; EMA; the
least-squares trend through the last K ∈ {4, 8, all} checkpoints evaluated at the newest and 1–2
checkpoints ahead; Extra-Merge over its α grid. *Theory* candidates are the fit's own merges (Extra-Merge at
α* and the theory-optimal weights, :mod:`extramerge.study.theory`); they compete on the same footing once
the gate lets them through. Every candidate is a dict: name, kind (plain/theory), method, its knobs and
``weights`` (oldest first), and a ``recipe`` that rebuilds it over any number of checkpoints (forecast).
"""

from __future__ import annotations

import numpy as np

from rivervalley import weights as W

from .inputs import StudyError

__all__ = ["plain_menu", "extra", "rebuild", "quick_pool", "TREND_AHEAD"]

TREND_AHEAD = (0, 1, 2)  # checkpoints past the newest at which the trend line is read


def _k_label(k: int, n: int) -> str:
    return "all" if k == n else str(k)


def _windows(sizes, n: int, least: int) -> list[int]:
    """The window sizes that fit (≥ least, ≤ n) plus ``all`` (= n), without repeats, in order."""
    out = []
    for k in [*sizes, n]:
        if least <= k <= n and k not in out:
            out.append(k)
    return out


def plain_menu(n: int, cfg) -> tuple[list[dict], list[int]]:
    """The plain candidates over n checkpoints and the Extra-Merge offsets that fit."""
    K = cfg.window
    if n < K + 1:
        raise StudyError(f"{n} checkpoints: Extra-Merge with --window {K} needs at least {K + 1}")
    offsets = [d for d in cfg.offsets if 1 <= d and K + d <= n]
    if not offsets:
        raise StudyError(f"--offsets {list(cfg.offsets)}: none fits K + d <= {n} checkpoints (K = {K})")
    out = [rebuild({"method": "last"}, n)]
    for k in _windows(cfg.sma_windows, n, 2):
        out.append(rebuild({"method": "sma", "window": k}, n))
    for k in _windows(cfg.sma_windows, n, 2):
        out.append(rebuild({"method": "wma", "window": k}, n))
    for b in cfg.ema_decays:
        out.append(rebuild({"method": "ema", "decay": float(b)}, n))
    for k in _windows(cfg.trend_windows, n, 3):
        for ahead in TREND_AHEAD:
            out.append(rebuild({"method": "trend", "window": k, "ahead": ahead}, n))
    for d in offsets:
        for a in cfg.alphas:
            if a != 0:
                out.append(extra(n, K, d, a))
    return out, offsets


def extra(n: int, K: int, d: int, a: float, kind: str = "plain") -> dict:
    c = rebuild({"method": "extra", "window": K, "offset": d, "alpha": float(a)}, n)
    if kind == "theory":
        c.update(kind="theory", group="alpha*", name=f"Extra K={K} d={d} alpha*={a:.3g}")
    return c


def rebuild(recipe: dict, n: int) -> dict:
    """A candidate from its recipe over n checkpoints. Windows recorded as ``all`` (``window_all``) take
    every checkpoint; custom weights keep their vector over the newest ones."""
    r = dict(recipe)
    m = r["method"]
    k = n if r.get("window_all") else r.get("window")
    if m == "last":
        w, name = np.eye(n)[-1], "last"
    elif m == "sma":
        w, name = W.sma(n, k), f"SMA K={_k_label(k, n)}"
    elif m == "wma":
        w, name = W.wma(n, k), f"WMA K={_k_label(k, n)}"
    elif m == "ema":
        w, name = W.ema(n, r["decay"]), f"EMA beta={r['decay']:g}"
    elif m == "trend":
        w, name = W.trend(n, k, r["ahead"]), f"trend K={_k_label(k, n)} ahead={r['ahead']:g}"
    elif m == "extra":
        w = W.extra(n, r["window"], r["offset"], r["alpha"])
        name = f"Extra K={r['window']} d={r['offset']} alpha={r['alpha']:g}"
    elif m == "custom":
        v = np.asarray(r["vector"], dtype=float)
        if v.size > n:
            raise StudyError(f"a weight vector over {v.size} checkpoints cannot be rebuilt over {n}")
        w, name = np.concatenate([np.zeros(n - v.size), v]), r.get("name", "custom")
    else:
        raise StudyError(f"unknown merge method {m!r}")
    if k is not None and m in ("sma", "wma", "trend"):
        r["window"], r["window_all"] = int(k), bool(r.get("window_all") or k == n)
    c = {"name": name, "kind": r.pop("kind", "plain"), "method": m, "weights": w, "recipe": r}
    for key in ("window", "offset", "alpha", "decay", "ahead"):
        if key in r:
            c[key] = r[key]
    return c


def quick_pool(menu: list[dict], offsets) -> list[dict]:
    """Quick mode's candidates on the calibration half: the newest checkpoint, SMA K=2/4, WMA K=4, EMA 0.8,
    the trend through every checkpoint (at the newest and one ahead), every α of Extra-Merge at the middle
    offset (where the α > 0 wins were), and the theory's offered merges."""
    d = offsets[len(offsets) // 2]
    keep = {"last", "SMA K=2", "SMA K=4", "WMA K=4", "EMA beta=0.8"}
    out = []
    for c in menu:
        m = c["method"]
        if (
            c["name"] in keep
            or c["kind"] == "theory"
            or (m == "trend" and c["recipe"].get("window_all") and c["ahead"] in (0, 1))
            or (m == "extra" and c["offset"] == d)
        ):
            out.append(c)
    return out
