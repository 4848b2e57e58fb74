"""Is a user's merge a proper affine merge, with the weights it claims? (THEORY.md §d' and invariants 1–2.)

A merge of N checkpoints θ_1..θ_N (oldest first) is affine when it is Σ_j w_j θ_j with one weight vector w
for every coordinate and Σ_j w_j = 1; then it is translation-equivariant, lies on any straight line the
checkpoints lie on, and trails the newest checkpoint by lag(w) = N − Σ_j j w_j checkpoints. The checks
below probe a function ``fn([N, p] array) -> [p] array`` with random checkpoints, recover w, and raise
``AssertionError`` saying which guarantee failed, on which input and by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["check_affine_merge", "check_exact_on_lines", "default_rtol"]

_BACKENDS = ("numpy", "torch")


def default_rtol(dtype) -> float:
    """Relative tolerance for a merge computed in ``dtype``: 1e-9 for float64, 1e-5 for float32, 5e-4 for
    float16 and 4e-3 for bfloat16. Weights are compared to 4·rtol: recovered weights of SMA, EMA, trend
    and Extra-Merge (n ≤ 16, 100 seeds) erred by at most 6e-15, 6e-8, 4e-4 and 3e-3 in these dtypes."""
    name = str(dtype).replace("torch.", "")
    return {"float64": 1e-9, "float32": 1e-5, "float16": 5e-4, "bfloat16": 4e-3}.get(name, 1e-9)


def _convert(x: np.ndarray, backend: str, dtype):
    if backend == "numpy":
        try:
            return np.array(x, dtype=np.dtype(str(dtype).replace("torch.", "")))
        except TypeError as exc:
            raise ValueError(f"dtype must name a numpy dtype for backend='numpy', got {dtype!r}") from exc
    import torch

    tdtype = (
        dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""), None)
    )
    if not isinstance(tdtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype for backend='torch', got {dtype!r}")
    return torch.tensor(x, dtype=tdtype)


def _to_numpy(y) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().double().numpy()
    return np.asarray(y, dtype=np.float64)


class Probe:
    """Calls ``fn`` on checkpoint arrays, checks the contract (shape, finite, input untouched)."""

    def __init__(self, fn: Callable, n: int, p: int, backend: str, dtype):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.fn, self.n, self.p, self.backend, self.dtype = fn, n, p, backend, dtype
        self.name = getattr(fn, "__qualname__", None) or type(fn).__name__

    def __call__(self, x: np.ndarray, what: str) -> np.ndarray:
        __tracebackhide__ = True
        arg = _convert(x, self.backend, self.dtype)
        before = _to_numpy(arg).copy()
        try:
            out = self.fn(arg)
        except Exception as exc:
            raise AssertionError(
                f"{self.name} raised {type(exc).__name__}: {exc} (on {what}, checkpoints of shape "
                f"[{self.n}, {self.p}])"
            ) from exc
        if not np.array_equal(_to_numpy(arg), before, equal_nan=True):
            raise AssertionError(
                f"{self.name} modified its input in place (on {what}): a merge must leave the checkpoints "
                "as they were (an in-place torch._foreach_*_ or += on a view of the input?)"
            )
        y = _to_numpy(out)
        if y.shape != (self.p,):
            raise AssertionError(
                f"{self.name} returned shape {y.shape} for checkpoints of shape [{self.n}, {self.p}] "
                f"({what}); a merge returns one vector of shape [{self.p}]"
            )
        if not np.all(np.isfinite(y)):
            raise AssertionError(f"{self.name} returned NaN or inf on {what}")
        return y


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def fmt_weights(w) -> str:
    """A weight vector as the messages print it (oldest first)."""
    w = np.asarray(w, dtype=float)
    w = np.where(np.abs(w) < 5e-5 * max(1.0, float(np.abs(w).max(initial=0.0))), 0.0, w) + 0.0  # no "-0."
    return np.array2string(w, precision=4, suppress_small=True, max_line_width=10**6)


def _gap(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a - b)
    i = int(np.argmax(diff))
    return float(diff[i]), i


def _support(w: np.ndarray, tol: float) -> str:
    idx = np.flatnonzero(np.abs(w) > tol) + 1
    if idx.size == 0:
        return "no checkpoint"
    if idx.size == idx[-1] - idx[0] + 1:
        return f"checkpoints {idx[0]}–{idx[-1]}" if idx.size > 1 else f"checkpoint {idx[0]}"
    return "checkpoints " + ",".join(map(str, idx))


def _proportional_hint(w: np.ndarray, expected: np.ndarray, tol: float) -> list[str]:
    """Weights that are the expected ones times one factor, except at one checkpoint (how an average
    starts: an EMA begun at zero and bias-corrected instead of begun at θ_1, say)."""
    nz = np.flatnonzero(np.abs(expected) > tol)
    if nz.size < 3:
        return []
    ratio = w[nz] / expected[nz]
    for skip in range(nz.size):
        rest = np.delete(ratio, skip)
        if np.ptp(rest) <= tol * 10 and abs(rest[0] - 1.0) > tol * 10:
            return [
                f"it is the expected weights times {rest.mean():.5g} except at checkpoint {nz[skip] + 1} "
                "(how the average is started or normalised: a bias-corrected EMA?)"
            ]
    return []


def _mismatch_hints(w: np.ndarray, expected: np.ndarray, tol: float) -> list[str]:
    n = w.size
    hints = []
    if _support(w, tol) != _support(expected, tol):
        hints.append(f"it uses {_support(w, tol)} of {n}, expected {_support(expected, tol)}")
    hints += _proportional_hint(w, expected, tol)
    for k, where in ((-1, "older"), (1, "newer")):
        shifted = np.zeros(n)
        if k < 0:
            shifted[:-1] = expected[1:]
            lost = abs(expected[0]) > tol
        else:
            shifted[1:] = expected[:-1]
            lost = abs(expected[-1]) > tol
        if not lost and np.allclose(w, shifted, rtol=0, atol=tol):
            hints.append(
                f"its weights are the expected ones moved one checkpoint {where}: an off-by-one window?"
            )
    lag_w, lag_e = (round(float(n - v @ np.arange(1, n + 1)), 9) + 0.0 for v in (w, expected))
    if abs(lag_w - lag_e) > tol:
        hints.append(f"it trails the newest checkpoint by {lag_w:.4g} checkpoints, expected {lag_e:.4g}")
    return hints


def check_affine_merge(
    fn: Callable,
    n: int,
    p: int | None = None,
    expected: Sequence[float] | None = None,
    *,
    backend: str = "numpy",
    dtype="float64",
    rtol: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Check that ``fn`` merges N checkpoints as one affine weight vector; return that vector (oldest first).

    ``fn`` takes an array of checkpoints ``[n, p]`` (numpy, or a torch tensor with ``backend='torch'``, in
    ``dtype``) and returns the merged vector ``[p]``. Verified, in this order, on random checkpoints:
    ``fn`` leaves its input unchanged; it is linear (fn(A + B) = fn(A) + fn(B), fn(cA) = c·fn(A)); it
    applies the same weights to every coordinate; the weights sum to 1 (shifting every checkpoint by b
    shifts the merge by b); and, when ``expected`` is given, the weights equal ``expected`` (e.g.
    ``rivervalley.weights.extra(n, window=4, offset=2, alpha=0.5)``). ``p`` defaults to 2n + 3 (more
    coordinates than checkpoints, so one call identifies w); a smaller p makes several calls.
    ``rtol`` defaults to :func:`default_rtol` of ``dtype``. Raises ``AssertionError`` on the first failure.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not the kit's
    n = _int("n", n, 1)
    p = max(2 * n + 3, 8) if p is None else _int("p", p, 1)
    tol = default_rtol(dtype) if rtol is None else float(rtol)
    probe = Probe(fn, n, p, backend, dtype)
    rng = np.random.default_rng(seed)
    draw = lambda *shape: _to_numpy(_convert(rng.standard_normal(shape), backend, dtype))  # noqa: E731 - as fn sees it
    A, B = draw(n, p), draw(n, p)
    yA, yB = probe(A, "random checkpoints A"), probe(B, "random checkpoints B")
    scale = max(1.0, float(np.abs(yA).max()), float(np.abs(yB).max()))

    c = -1.7
    for got, want, what in (
        (probe(A + B, "A + B"), yA + yB, "fn(A + B) differs from fn(A) + fn(B)"),
        (probe(c * A, f"{c}·A"), c * yA, f"fn({c}·A) differs from {c}·fn(A)"),
    ):
        gap, i = _gap(got, want)
        if gap > tol * abs(c) * 4 * scale:
            raise AssertionError(
                f"not linear in the checkpoints: {what} by {gap:.3g} at coordinate {i} (n={n}, p={p}); an "
                "affine merge is Σ_j w_j θ_j with fixed weights (data-dependent weights, clipping, "
                "normalisation or an added constant break this)"
            )

    probes, outs = [A, B], [yA, yB]
    for k in range(max(0, math.ceil((2 * n + 3) / p) - 2)):  # enough equations to identify n weights
        X = draw(n, p)
        probes.append(X)
        outs.append(probe(X, f"random checkpoints #{k + 3}"))
    design = np.concatenate(probes, axis=1).T  # [calls·p, n]: one equation per output coordinate
    target = np.concatenate(outs)
    w = np.linalg.lstsq(design, target, rcond=None)[0]
    residual, i = _gap(design @ w, target)
    if residual > tol * 8 * scale:
        raise AssertionError(
            f"not the same weights for every coordinate: coordinate {i % p} of call {i // p + 1} is off by "
            f"{residual:.3g} from the best common weight vector {fmt_weights(w)} (n={n}, p={p})"
        )

    shift = draw(p)
    moved = probe(A + shift[None, :], "A shifted by one vector b") - yA
    total = float(w.sum())
    gap, _ = _gap(moved, shift)
    wtol = tol * 4 * max(1.0, float(np.abs(w).max()))
    if abs(total - 1.0) > wtol or gap > tol * 8 * max(scale, float(np.abs(shift).max())):
        raise AssertionError(
            f"not translation-equivariant: shifting every checkpoint by the same vector b moves the merge by "
            f"{total:.6g}·b instead of b, because its weights sum to {total:.6g}, not 1 (weights "
            f"{fmt_weights(w)}, n={n}): a window that divides by the wrong count, or a bias correction?"
        )

    if expected is not None:
        want = np.asarray(expected, dtype=float)
        if want.shape != (n,):
            raise ValueError(f"expected must have one weight per checkpoint ({n}), got shape {want.shape}")
        gap, j = _gap(w, want)
        if gap > wtol:
            hints = "; ".join(_mismatch_hints(w, want, wtol))
            raise AssertionError(
                f"weights differ from the expected ones by up to {gap:.4g} (at checkpoint {j + 1} of {n}, "
                f"oldest = 1): got {fmt_weights(w)}, expected {fmt_weights(want)}; {hints}"
            )
    return w


def check_exact_on_lines(
    fn: Callable,
    n: int,
    *,
    p: int | None = None,
    at: float | None = None,
    steps: Sequence[float] | None = None,
    backend: str = "numpy",
    dtype="float64",
    rtol: float | None = None,
    seed: int = 0,
) -> float:
    """Checkpoints on a straight line θ_j = a + t_j·b are merged onto that line, at the place the merge's
    weights say (THEORY.md invariant 2); returns that place t (in checkpoint positions).

    Positions t_j are 1..n, or ``steps``. The merge must land at t = Σ_j w_j t_j, i.e. ``lag(w)`` behind the
    newest checkpoint, with w recovered by :func:`check_affine_merge`; ``at`` states where it should land
    instead (``at=n`` for a zero-lag merge, ``n + ahead`` for an extrapolation ``ahead`` checkpoints past
    the newest). Raises ``AssertionError`` if the merge leaves the line or lands elsewhere.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not the kit's
    n = _int("n", n, 1)
    p = max(2 * n + 3, 8) if p is None else _int("p", p, 1)
    tol = default_rtol(dtype) if rtol is None else float(rtol)
    t = np.arange(1, n + 1, dtype=float) if steps is None else np.asarray(steps, dtype=float)
    if t.shape != (n,) or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise ValueError(f"steps must be {n} finite, strictly increasing positions, got {steps!r}")
    rng = np.random.default_rng(seed + 1)
    a, b = 3.0 * rng.standard_normal(p), rng.standard_normal(p)
    y = Probe(fn, n, p, backend, dtype)(a[None, :] + t[:, None] * b[None, :], "checkpoints on a line")
    place = float((y - a) @ b / (b @ b))
    off = float(np.abs(y - a - place * b).max())
    scale = max(float(np.abs(a).max()), float(np.abs(t).max() * np.abs(b).max()), 1.0)
    step = float(np.abs(t[-1] - t[0]) / max(n - 1, 1))
    if off > tol * 8 * scale:
        raise AssertionError(
            f"the merge of {n} checkpoints on a straight line leaves the line by {off:.3g} (the line moves "
            f"{float(np.abs(b).max() * step):.3g} per checkpoint; closest point at position {place:.6g})"
        )
    if at is None:
        w = check_affine_merge(fn, n, p, backend=backend, dtype=dtype, rtol=rtol, seed=seed)
        want, why = float(w @ t), f"where its weights put it (lag {float(t[-1] - w @ t):.6g})"
    else:
        want, why = float(at), "where it should"
    if abs(place - want) > tol * 4 * max(1.0, float(np.abs(t).max())):
        raise AssertionError(
            f"on a straight line the merge lands at position {place:.6g} (newest checkpoint at {t[-1]:g}), "
            f"not at {want:.6g} {why}: {abs(place - want):.4g} "
            f"{'behind' if place < want else 'ahead'}"
        )
    return place
