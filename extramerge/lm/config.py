"""What a training run is: ``TrainConfig`` (what was asked for; ``None`` means "derive it"), the frozen
``ResolvedConfig`` that ``resolve`` validates and derives from it (what the run uses), the lr schedule it
implies and the steps at which it writes checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from rivervalley.schedules import Schedule, get_schedule, wsd

from .models import ARCHS, Preset, resolve_size

__all__ = [
    "TrainConfig",
    "ResolvedConfig",
    "resolve",
    "build_schedule",
    "checkpoint_steps_with_final",
    "OPTIMIZERS",
    "SCHEDULE_NAMES",
    "DEFAULT_LR",
    "DEFAULT_ADAM_LR",
    "RESUME_FREE",
]

OPTIMIZERS = ("adamw", "muon")
SCHEDULE_NAMES = ("constant", "cosine", "wsd")
DEFAULT_LR = {"adamw": 1e-3, "muon": 1e-2}
DEFAULT_ADAM_LR = 3e-3  # embeddings, lm_head, norms and biases when --optimizer muon
# Fields that may differ between a run and its --resume (they change speed or display, not the numbers).
RESUME_FREE = ("out", "resume", "stop_at", "progress", "device", "compile", "threads")


@dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` means "derive it" (see ``resolve``)."""

    out: str = "runs/lm"
    arch: str = "gpt2"
    size: str = "tiny"
    n_layer: int | None = None  # shape overrides of the preset
    d_model: int | None = None
    n_head: int | None = None
    seq_len: int | None = None  # None: the preset's context
    corpus: str = "pydoc"
    optimizer: str = "adamw"
    lr: float | None = None  # AdamW lr, or the Muon matrices' lr; None: DEFAULT_LR[optimizer]
    adam_lr: float | None = None  # Muon runs only: lr of the AdamW groups; None: DEFAULT_ADAM_LR
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"
    schedule: str = "cosine"
    warmup: int | None = None  # None: 5% of steps
    final_lr_frac: float = 0.0  # cosine / wsd end at final_lr_frac · lr
    decay_fraction: float = 0.2  # wsd
    wsd_shape: str = "linear"
    steps: int = 1000
    batch_size: int = 32
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    ckpt_every: int = 100
    ckpt_from: int | None = None  # None: the last 30% of training (see extramerge.lm.train)
    eval_every: int = 0  # 0: validation only at checkpoints
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # extra resume saves between checkpoints; 0: only at checkpoints
    device: str = "auto"
    compile: bool = False
    threads: int | None = None  # CPU threads; None: every core available to this process
    resume: bool = False
    stop_at: int | None = None  # pause after this step with a resume save (continue later with --resume)
    progress: bool = True
    online_merge: str | None = None  # e.g. "ema:0.99,sma:8,extra:0.5@4" (extramerge.online.spec)
    online_every: int | None = None  # None: 1 (an update after every optimizer step)
    online_device: str | None = None  # None: beside the parameters; "cpu": on the host
    online_save: bool | None = None  # also save the merges at every checkpoint (RUN/online/NAME/step_X)
    extra: dict = field(default_factory=dict)  # free-form notes recorded in run.json


@dataclass(frozen=True)
class ResolvedConfig:
    """What a run actually uses: every ``TrainConfig`` field with its derived default filled in (same names,
    same order), plus ``preset`` (the model shape) and ``tokens_per_step``. Built by ``resolve``; its
    ``to_dict()`` is the dict that ``run.json`` records (the ``resolved`` entry holds what differs from the
    given config)."""

    out: str
    arch: str
    size: str
    n_layer: int | None  # the shape overrides as given; the shape the run uses is ``preset``
    d_model: int | None
    n_head: int | None
    seq_len: int
    corpus: str
    optimizer: str
    lr: float
    adam_lr: float | None  # None unless optimizer == "muon"
    weight_decay: float
    beta1: float
    beta2: float
    muon_momentum: float
    muon_adjust_lr: str
    schedule: str
    warmup: int
    final_lr_frac: float
    decay_fraction: float
    wsd_shape: str
    steps: int
    batch_size: int
    grad_clip: float
    seed: int
    ckpt_every: int
    ckpt_from: int
    eval_every: int
    eval_batches: int
    log_every: int
    save_every: int
    device: str  # "cpu" or "cuda[:N]", never "auto"
    compile: bool
    threads: int | None
    resume: bool
    stop_at: int | None
    progress: bool
    online_merge: str | None
    online_every: int
    online_device: str | None
    online_save: bool
    extra: dict
    preset: Preset
    tokens_per_step: int  # batch_size · seq_len

    def to_dict(self) -> dict:
        """Plain JSON-ready values, ``preset`` as a dict: the fields in order."""
        return asdict(self)


def resolve(config: TrainConfig) -> ResolvedConfig:
    """Validated config with every derived default filled in (what the run actually uses)."""
    c = config
    if c.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {c.arch!r}")
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {c.optimizer!r}")
    if c.schedule not in SCHEDULE_NAMES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {c.schedule!r}")
    preset = resolve_size(c.size, n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head, seq_len=c.seq_len)
    for k in ("steps", "batch_size", "ckpt_every", "eval_batches", "log_every"):
        v = getattr(c, k)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for k in ("eval_every", "save_every"):
        v = getattr(c, k)
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 0, got {v!r}")
    lr = DEFAULT_LR[c.optimizer] if c.lr is None else float(c.lr)
    adam_lr = None
    if c.optimizer == "muon":
        adam_lr = DEFAULT_ADAM_LR if c.adam_lr is None else float(c.adam_lr)
    for k, v in (("lr", lr), ("adam_lr", adam_lr)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{k.replace('_', '-')} must be a positive number, got {v!r}")
    for k in ("weight_decay", "grad_clip", "final_lr_frac"):
        v = getattr(c, k)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{k.replace('_', '-')} must be a number >= 0, got {v!r}")
    if c.final_lr_frac > 1:
        raise ValueError(f"--final-lr-frac must be in [0, 1], got {c.final_lr_frac}")
    warmup = c.steps // 20 if c.warmup is None else c.warmup
    if not isinstance(warmup, int) or not 0 <= warmup < c.steps:
        raise ValueError(f"--warmup must be an integer in [0, steps={c.steps}), got {warmup!r}")
    ckpt_from = c.ckpt_from
    if ckpt_from is None:
        ckpt_from = max(c.steps - c.ckpt_every * int(0.3 * c.steps // c.ckpt_every), 1)
    if not isinstance(ckpt_from, int) or not 1 <= ckpt_from <= c.steps:
        raise ValueError(f"--ckpt-from must be an integer in [1, steps={c.steps}], got {ckpt_from!r}")
    if c.stop_at is not None and (not isinstance(c.stop_at, int) or c.stop_at < 1):
        raise ValueError(f"--stop-at must be an integer >= 1, got {c.stop_at!r}")
    device = c.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {config.device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    derived = dict(
        seq_len=preset.seq_len,
        lr=lr,
        adam_lr=adam_lr,
        warmup=warmup,
        ckpt_from=ckpt_from,
        device=device,
        **_resolve_online(c),
        preset=preset,
        tokens_per_step=c.batch_size * preset.seq_len,
    )
    return ResolvedConfig(**{**asdict(config), **derived})


def _resolve_online(c: TrainConfig) -> dict:
    """Check the --online-* flags (one-line errors naming the flag); their values with defaults filled."""
    from extramerge.online.spec import parse_spec

    if c.online_merge is not None:
        parse_spec(c.online_merge, "--online-merge")
    elif c.online_every is not None or c.online_device is not None or c.online_save:
        raise ValueError("--online-every/--online-device/--online-save need --online-merge")
    every = 1 if c.online_every is None else c.online_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"--online-every must be an integer >= 1, got {every!r}")
    if c.online_device not in (None, "cpu"):
        raise ValueError(
            f"--online-device must be cpu (or left out: beside the parameters), got {c.online_device!r}"
        )
    return {"online_every": every, "online_save": bool(c.online_save)}


def build_schedule(r: ResolvedConfig) -> Schedule:
    """The run's lr schedule (peak = ``lr``). A constant schedule with warmup is WSD without decay."""
    final = r.final_lr_frac * r.lr
    if r.schedule == "constant":
        if r.warmup == 0:
            return get_schedule("constant", r.lr)
        return wsd(r.lr, r.steps, warmup=r.warmup, decay_steps=0)
    if r.schedule == "cosine":
        return get_schedule("cosine", r.lr, r.steps, warmup=r.warmup, final_lr=final)
    return get_schedule(
        "wsd",
        r.lr,
        r.steps,
        warmup=r.warmup,
        decay_fraction=r.decay_fraction,
        shape=r.wsd_shape,
        final_lr=final,
    )


def checkpoint_steps_with_final(steps: int, ckpt_every: int, ckpt_from: int) -> list[int]:
    """``ckpt_from, ckpt_from + ckpt_every, ... <= steps``, plus ``steps`` itself: the steps at which the
    trainer writes a checkpoint. (Unlike ``rivervalley.simulate.checkpoint_steps``, which returns
    ``(steps, array)`` and does not add the final step.)"""
    out = list(range(ckpt_from, steps + 1, ckpt_every))
    return out if out and out[-1] == steps else [*out, steps]
