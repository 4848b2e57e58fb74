"""``extramerge study``: which merge of a run's checkpoints to ship, with its predicted and measured gain.

    from extramerge.study import StudyConfig, study
    report = study(StudyConfig(checkpoints=["runs/gpt2"], data=["heldout.jsonl"], out=Path("study")))
    report["recommendation"]   # method, weights (oldest first), alpha, offset, predicted_delta, ...
    report["measured"]         # every merge measured on the measurement half: delta, se

Needs transformers (``pip install 'rivervalley-extramerge[lm]'``). The method: :mod:`extramerge.study.core`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .core import CANDIDATE_ALPHAS, StudyConfig, run_study
from .inputs import StudyError

__all__ = ["StudyConfig", "StudyError", "study", "CANDIDATE_ALPHAS", "check_output"]


def check_output(out: Path, inputs, force: bool) -> Path:
    """Refuse an output that is or holds an input, a special file, or an existing non-empty folder that is
    not an earlier study (its marker), and that one without ``force`` (``publish.refusal``'s rule)."""
    from rivervalley.common.publish import refusal

    from ..io import outputs

    out = Path(out)
    for p in map(Path, inputs):
        rel = outputs.overlap(out, p)
        if rel in ("is", "contains") or (rel == "lies inside" and (p / "config.json").is_file()):
            raise StudyError(f"{out}: the output folder {rel} the input {p} (pick another -o)")
    outputs.refuse_special(out)
    why = refusal(out, force, lambda p: outputs.is_output(p, "study"))
    if why == "force":
        raise StudyError(f"{out}: output exists (pass --force to replace it)")
    if why == "foreign":
        raise StudyError(
            f"{out}: exists and is not an earlier study (no {outputs.MARKER} marker); not replacing it"
        )
    return out


def study(cfg: StudyConfig) -> dict:
    """Run the study and publish study.json, study.md and the figure to ``cfg.out`` (atomically); with
    ``predict_only`` publish predictions.json and predictions.md instead (:mod:`.prereg`)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise StudyError(
            "extramerge study evaluates merges with transformers: pip install 'rivervalley-extramerge[lm]'"
        ) from None
    from rivervalley.common.formatting import jsonable
    from rivervalley.common.publish import publishing
    from rivervalley.common.resources import flush_denormals

    from ..io import outputs
    from . import report as R
    from .prereg import FILE

    if cfg.dry_run:
        from .core import dry_run

        return dry_run(cfg)
    from .. import distributed

    inputs = cfg.checkpoints + list(cfg.data) + [p for p in (cfg.calib, cfg.test, cfg.measure) if p]
    out = check_output(Path(cfg.out), inputs, cfg.force)
    group = distributed.current()
    if group is not None and not group.leader:  # under torchrun: every rank evaluates, rank 0 publishes
        with flush_denormals():
            rep = run_study(cfg, None)
        rep["out"] = str(out)
        return rep
    # force: an earlier study, checked above, is replaced only once the new one is complete
    with publishing(out, force=True, commit=outputs.publish) as tmp:
        with flush_denormals():
            rep = run_study(cfg, tmp)
        try:
            if cfg.predict_only:
                (tmp / FILE).write_text(json.dumps(jsonable(rep, finite=True), indent=1))
                (tmp / "predictions.md").write_text(R.markdown(rep))
            else:
                fig = R.alpha_figure(rep, tmp / "alpha.png")
                rep["figures"] = ["alpha.png"] if fig else []
                (tmp / "study.json").write_text(json.dumps(jsonable(rep), indent=1))
                (tmp / "study.md").write_text(R.markdown(rep))
        except (KeyError, TypeError, IndexError) as e:  # only reachable from a hand-edited predictions.json
            raise StudyError(
                f"--measure {cfg.measure}: a malformed field ({type(e).__name__}: {e})"
            ) from None
        outputs.mark_output(tmp, "study")
    rep["out"] = str(out)
    return rep
