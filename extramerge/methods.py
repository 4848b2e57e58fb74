"""The registry of merge methods: name, parameters, builder and whether it needs the Gram matrix.

Every merge is an affine weight vector over the checkpoints (oldest first). A method is one
:class:`Method` entry in :data:`REGISTRY` that declares its parameters (:class:`Param`: name, type, default,
help); the Python API's keywords and checks (``extramerge.api.plan``/``merge``) and the CLI's ``--method``
choices, help and knob flags are derived from it, so adding a method, with new knobs or not, is one entry
here. Builders get what they need handed to them (the knobs, the opened checkpoints, the Gram matrix where
the entry says so): this module computes nothing from the checkpoints' tensors. Defaults, with N the number
of checkpoints:

    sma     window K = N                       uniform average of the last K
    wma     window K = N                       weights ∝ 1..K, newest heaviest
    ema     decay β = 1 − 2/(N+1)              same centre of mass as SMA over all N
    extra   K = ⌊N/2⌋, d = N − K, α = α_match  needs K + d ≤ N; α may be a number, 'match' = (K−1)/(2d)
                                               (zero lag on a straight river) or 'geometric' (noise-aware,
                                               one extra Gram pass; see rivervalley.theory.alpha)
    trend   window K = N, ahead = 0            least-squares line through the last K, evaluated ``ahead``
                                               checkpoints past the newest
    pc1     window K = N, ahead = 0            SMA of the last K moved onto the PC1 trend line ``ahead``
                                               past the newest; needs the Gram matrix: one extra read pass,
                                               or none when ``gram=`` gives an analysis' gram.npz
    decay   window K = N, shape = linear       the merge that emulates a learning-rate decay of that shape
                                               (linear, minus_sqrt, cosine) over the last K checkpoints
                                               saved at a constant rate (WSM; Megatron weighted_merge.py);
                                               linear is the SMA of the K
    posthoc-ema  sigma_rel or gamma (required)  a power-function EMA fitted after training (EDM2): over EMA
                                               snapshots whose safetensors metadata carry extramerge.gamma
                                               (and extramerge.step), or over raw checkpoints (each stands
                                               for its interval of steps); merge.json records the fit's
                                               relative residual
    custom  weights (one per checkpoint)        a sum other than 1 is allowed with a warning (the merge is
                                               then not translation-equivariant: it rescales the weights)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rivervalley import analysis as _analysis
from rivervalley import weights as _weights
from rivervalley.theory import alpha as _alpha

from .argtypes import floats
from .io.layout import GAMMA_KEY, STEP_KEY
from .io.safety import shown

__all__ = [
    "Param",
    "Method",
    "REGISTRY",
    "NAMES",
    "GAMMA_KEY",
    "STEP_KEY",
    "get",
    "all_params",
    "reject_unused",
    "cli_help",
]

POOR_FIT = 0.1  # a post-hoc EMA whose relative profile residual exceeds this gets a note


@dataclass(frozen=True)
class Param:
    """One knob of a merge method: the keyword ``name`` of ``extramerge.merge``/``api.plan`` and the CLI
    flag ``--name`` (underscores as dashes), with its help text and metavar.

    ``type`` parses the flag's text (None: the text as given; Python callers pass values). ``default`` is
    the value when the knob is not given (None: the builder derives it, usually from N); a knob equal to
    its default counts as not given. Methods sharing a knob declare the same Param (the CLI has one flag).
    """

    name: str
    type: Callable[[str], object] | None = None
    default: object = None
    help: str = ""
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


WINDOW = Param("window", int, help="checkpoints per window (default: all N; extra: N//2)", metavar="K")
OFFSET = Param(
    "offset", int, help="extra: distance d between the two windows' ends (default N − K)", metavar="D"
)
ALPHA = Param(
    "alpha",
    help="extra: a number, 'match' ((K−1)/(2d): zero lag, the default) or 'geometric' "
    "(noise-aware estimate from a Gram pass)",
    metavar="A",
)
DECAY = Param("decay", float, help="ema: decay β in [0,1) (default 1 − 2/(N+1))", metavar="B")
WEIGHTS = Param(
    "weights",
    floats,
    help="custom: one weight per checkpoint, oldest first (a leading minus needs --weights=-0.5,1.5)",
    metavar="W1,W2,...",
)
AHEAD = Param(
    "ahead",
    float,
    0.0,
    help="trend/pc1: evaluate the line H checkpoints past the newest (default 0)",
    metavar="H",
)
GRAM = Param(  # where the Gram matrix comes from (gram.npz, or GramData in Python): read by the API
    "gram",
    help="pc1 / --alpha geometric: reuse gram.npz from `extramerge analyze` (no extra pass)",
    metavar="NPZ",
)
SHAPE = Param(
    "shape",
    help="decay: the learning-rate decay the merge emulates: linear (default), minus_sqrt, cosine",
    metavar="S",
)
SIGMA_REL = Param(
    "sigma_rel",
    float,
    help="posthoc-ema: the target EMA's relative width σ_rel in (0, 0.2887], e.g. 0.05",
    metavar="S",
)
GAMMA = Param("gamma", float, help="posthoc-ema: the target EMA's exponent γ >= 0", metavar="G")


@dataclass(frozen=True)
class Method:
    """One merge method.

    ``build(n, knobs, ckpts, gram)`` returns (weights, params, notes) for ``n`` checkpoints; ``knobs`` maps
    each of ``self.params`` to the caller's value, or its default when not given. Where ``needs_gram(knobs)``
    (the entry's ``gram`` rule) ``gram`` is a zero-argument function returning the trajectory's N×N Gram
    matrix, which the API computes by one streaming pass or reads from the ``gram`` knob on the first call
    (validate the knobs before calling it: the pass is long); otherwise calling it raises RuntimeError.
    """

    name: str
    params: tuple[Param, ...]
    build: Callable[..., tuple[np.ndarray, dict, list]]
    summary: str  # one line for the CLI's help
    gram: Callable[[dict], bool] = lambda knobs: False  # does this choice of knobs need the Gram matrix?

    @property
    def knobs(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)

    def needs_gram(self, knobs: dict) -> bool:
        return bool(self.gram(knobs))


def _uneven(ckpts) -> bool:
    steps = [getattr(c, "step", None) for c in ckpts]
    return len(steps) >= 3 and None not in steps and len(set(np.diff(steps).tolist())) > 1


def _uneven_steps(ckpts) -> str | None:
    if _uneven(ckpts):
        return "checkpoint steps are unevenly spaced; positions are taken as checkpoint indices (1..N)"
    return None


def _window(n: int, knobs: dict) -> int:
    return n if knobs.get("window") is None else knobs["window"]


def _ahead(knobs: dict) -> float:
    return 0.0 if knobs.get("ahead") is None else float(knobs["ahead"])


def _sma(n, knobs, ckpts, gram):
    K = _window(n, knobs)
    return _weights.sma(n, K), {"window": int(K)}, []


def _wma(n, knobs, ckpts, gram):
    K = _window(n, knobs)
    return _weights.wma(n, K), {"window": int(K)}, []


def _ema(n, knobs, ckpts, gram):
    beta = 1.0 - 2.0 / (n + 1) if knobs.get("decay") is None else knobs["decay"]
    return _weights.ema(n, beta), {"decay": float(beta)}, []


def _extra_windows(n: int, window, offset) -> tuple[int, int]:
    if window is None and offset is None:
        window = max(1, n // 2)
        offset = n - window
    elif window is None:
        window = n - int(offset)
    elif offset is None:
        offset = n - int(window)
    window, offset = int(window), int(offset)
    if window < 1 or offset < 0:
        raise ValueError(
            f"method 'extra' needs window >= 1 and offset >= 0, got window={window}, offset={offset}"
        )
    if window + offset > n:
        raise ValueError(
            f"method 'extra' with window K={window} and offset d={offset} needs K + d = {window + offset} "
            f"checkpoints, got {n}"
        )
    return window, offset


def _alpha_rule(alpha):
    """'match' (the default), 'geometric', or a number."""
    rule = "match" if alpha is None else alpha
    if isinstance(rule, str):
        rule = rule.strip().lower()
        if rule not in ("match", "geometric"):
            try:
                rule = float(rule)
            except ValueError:
                raise ValueError(f"alpha must be a number, 'match' or 'geometric', got {alpha!r}") from None
    return rule


def _extra(n, knobs, ckpts, gram):
    window, offset = _extra_windows(n, knobs.get("window"), knobs.get("offset"))
    alpha = knobs.get("alpha")
    params = {"window": window, "offset": offset}
    if offset == 0 and (alpha is None or isinstance(alpha, str)):
        raise ValueError("method 'extra' with offset d=0 cannot extrapolate: give --offset >= 1")
    estimates = {"alpha_match": _alpha.alpha_match(window, offset)} if offset else {}
    rule = _alpha_rule(alpha)
    if rule == "geometric":
        river = _alpha.estimate_river(gram())
        estimates["alpha_geometric"] = _alpha.alpha_geometric(river, window, offset)
        params["river"] = river.to_dict()
    if isinstance(rule, str):
        params["alpha_rule"] = rule
        alpha = estimates[f"alpha_{rule}"]
    else:
        params["alpha_rule"] = "given"
        alpha = float(rule)
    params["alpha"] = alpha
    params["alpha_estimates"] = estimates
    return _weights.extra(n, window, offset, alpha), params, []


def _trend(n, knobs, ckpts, gram):
    K, h = _window(n, knobs), _ahead(knobs)
    return _weights.trend(n, K, ahead=h), {"window": int(K), "ahead": float(h)}, [_uneven_steps(ckpts)]


def _pc1(n, knobs, ckpts, gram):
    K, h = _window(n, knobs), _ahead(knobs)
    _weights.sma(n, K)  # validate the window before a long pass
    G = gram()
    w = _analysis.pc1_trend_weights(G, K, ahead=h)
    params = {"window": int(K), "ahead": float(h), "fve1": float(_analysis.fve1(G))}
    return w, params, [_uneven_steps(ckpts)]


def _custom(n, knobs, ckpts, gram):
    if knobs.get("weights") is None:
        raise ValueError("method 'custom' needs weights (--weights w1,w2,...), one per checkpoint")
    w, affine = _weights.custom(knobs["weights"])
    if w.size != n:
        raise ValueError(f"got {w.size} weights for {n} checkpoints: give exactly one weight per checkpoint")
    notes = []
    if not affine:
        msg = f"custom weights sum to {w.sum():.6g}, not 1: the merge rescales the parameters"
        warnings.warn(msg, UserWarning, stacklevel=3)  # at plan()'s caller
        notes.append(msg)
    return w, {}, notes


def _decay(n, knobs, ckpts, gram):
    K = _window(n, knobs)
    shape = "linear" if knobs.get("shape") is None else knobs["shape"]
    w = _weights.decay(n, K, shape)
    notes = ["checkpoint steps are unevenly spaced: the emulated decay is a staircase over them"]
    return w, {"window": int(K), "shape": str(shape)}, notes if _uneven(ckpts[n - K :]) else []


def _metadata_number(c, key: str) -> float | None:
    text = (getattr(c, "metadata", None) or {}).get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise ValueError(f"{c.path}: metadata {key} = {shown(text, 40)} is not a finite number")
    return value


def _snapshots(ckpts) -> tuple[list[float], list[float] | None]:
    """Training steps and, for EMA snapshots, their γ (None for raw checkpoints) from the checkpoints."""
    steps, gammas = [], [_metadata_number(c, GAMMA_KEY) for c in ckpts]
    for c in ckpts:
        step = _metadata_number(c, STEP_KEY)
        step = getattr(c, "step", None) if step is None else step
        if step is None:
            raise ValueError(
                f"method 'posthoc-ema' needs each checkpoint's training step: {c.path} has none in its name "
                f"(step_XXXX) nor in its metadata ({STEP_KEY})"
            )
        steps.append(float(step))
    if None not in gammas:
        return steps, gammas
    if any(g is not None for g in gammas):
        raise ValueError(
            f"method 'posthoc-ema': some checkpoints are EMA snapshots ({GAMMA_KEY} in their metadata) and "
            "some are not; give only EMA snapshots or only raw checkpoints"
        )
    return steps, None


def _posthoc(n, knobs, ckpts, gram):
    if knobs.get("sigma_rel") is None and knobs.get("gamma") is None:
        raise ValueError("method 'posthoc-ema' needs the target EMA: --sigma-rel S or --gamma G")
    steps, gammas = _snapshots(ckpts)
    fit = _weights.posthoc_ema(steps, gammas, gamma=knobs.get("gamma"), sigma_rel=knobs.get("sigma_rel"))
    params = {
        "gamma": fit.gamma,
        "sigma_rel": fit.sigma_rel,
        "step": fit.step,
        "snapshots": "raw checkpoints" if gammas is None else "ema",
        "fit_residual": fit.residual,
    }
    if gammas is not None:
        params["snapshot_gammas"] = gammas
    notes = []
    if fit.residual > POOR_FIT:
        notes.append(
            f"poor fit: the merged profile differs from the target EMA by {fit.residual:.0%} (relative L2); "
            + (
                "the checkpoints are too sparse for this sigma_rel, or the target reaches before the oldest"
                if gammas is None
                else "the target lies far from the stored snapshots' gammas or steps"
            )
        )
    return fit.weights, params, notes


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sma", (WINDOW,), _sma, "mean of the last K"),
        Method("ema", (DECAY,), _ema, "exponential (decay B)"),
        Method("wma", (WINDOW,), _wma, "linear ramp"),
        Method(
            "extra",
            (WINDOW, OFFSET, ALPHA, GRAM),
            _extra,
            "Extra-Merge M_N + α(M_N − M_{N−d})",
            gram=lambda knobs: _alpha_rule(knobs.get("alpha")) == "geometric",
        ),
        Method("trend", (WINDOW, AHEAD), _trend, "least-squares line"),
        Method("pc1", (WINDOW, AHEAD, GRAM), _pc1, "SMA moved onto the PC1 trend", gram=lambda knobs: True),
        Method("decay", (WINDOW, SHAPE), _decay, "emulated LR decay (--shape)"),
        Method("posthoc-ema", (SIGMA_REL, GAMMA), _posthoc, "post-hoc power EMA (--sigma-rel)"),
        Method("custom", (WEIGHTS,), _custom, "--weights"),
    )
}
NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    """The method called ``name`` (case-insensitive); ValueError listing the choices otherwise."""
    method = REGISTRY.get(str(name).lower())
    if method is None:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(NAMES)}")
    return method


def all_params() -> dict[str, Param]:
    """Every knob of the registry by name, in the order methods first declare them (one CLI flag each).

    ValueError where two methods declare one name differently: the flag would mean two things."""
    out: dict[str, Param] = {}
    for m in REGISTRY.values():
        for p in m.params:
            if out.setdefault(p.name, p) != p:
                raise ValueError(f"method '{m.name}' declares knob {p.name!r} unlike another method: {p}")
    return out


def _given(value, default) -> bool:
    """Whether a knob's value counts as given: not None and not its declared default."""
    if value is None:
        return False
    return default is None or not isinstance(value, int | float) or value != default


def reject_unused(method: Method, given: dict) -> None:
    """ValueError for a knob given (not None, not its default) that ``method`` does not take, naming its
    flag; TypeError for a name that is no method's knob."""
    known = all_params()
    for knob, value in given.items():
        if knob not in known:
            raise TypeError(f"unknown merge knob {knob!r}: the knobs are {', '.join(known)}")
        if knob not in method.knobs and _given(value, known[knob].default):
            allowed = sorted(m.name for m in REGISTRY.values() if knob in m.knobs)
            raise ValueError(
                f"{known[knob].flag} ({knob}) does not apply to method '{method.name}' "
                f"(only to {', '.join(allowed)})"
            )


def cli_help() -> str:
    """The ``--method`` help line: every method and what it does."""
    return "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())
