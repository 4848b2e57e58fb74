"""Train a byte-level GPT-2 or LLaMA: ``python -m experiments.lm.train --help``.

The trainer lives in ``extramerge.lm`` (``config``, ``train``, ``checkpointing``, ``cli``, ...); this module
runs its command line and re-exports the names it used to define.
"""

import sys

from extramerge.lm.batches import Batches, eval_windows
from extramerge.lm.checkpointing import RESUME_FILE
from extramerge.lm.cli import config_from_args, main
from extramerge.lm.config import (
    DEFAULT_ADAM_LR,
    DEFAULT_LR,
    OPTIMIZERS,
    SCHEDULE_NAMES,
    TrainConfig,
    build_schedule,
    checkpoint_steps_with_final,
    resolve,
)
from extramerge.lm.optimizers import build_optimizers, param_groups
from extramerge.lm.train import Interrupted, train

checkpoint_steps = checkpoint_steps_with_final  # the old name (not rivervalley.simulate.checkpoint_steps)

__all__ = [
    "TrainConfig",
    "train",
    "resolve",
    "param_groups",
    "build_optimizers",
    "build_schedule",
    "checkpoint_steps",
    "checkpoint_steps_with_final",
    "Batches",
    "Interrupted",
    "main",
    "config_from_args",
    "eval_windows",
    "OPTIMIZERS",
    "SCHEDULE_NAMES",
    "DEFAULT_LR",
    "DEFAULT_ADAM_LR",
    "RESUME_FILE",
]

if __name__ == "__main__":
    sys.exit(main())
