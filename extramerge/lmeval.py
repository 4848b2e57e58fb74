"""Optional lm-evaluation-harness adapter: a re-export of ``extramerge.eval.lmeval`` (where the code now
lives), kept so that ``extramerge.lmeval`` imports keep working."""

from __future__ import annotations

from .eval.lmeval import CLOZE_TASK, PPL_TASK, require_lm_eval, run_lm_eval, write_task

__all__ = ["write_task", "run_lm_eval", "require_lm_eval", "CLOZE_TASK", "PPL_TASK"]
