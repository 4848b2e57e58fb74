"""extramerge: stream-merge, extrapolate and diagnose real training checkpoints.

Python API (the CLI `extramerge` is a thin layer over these):
    extramerge.merge(checkpoints, method="sma", window=4, ..., output="out/")   -> summary
    extramerge.analyze(checkpoints, windows=(1, 2, 4, 8), output="report/")    -> report dict

Where each concern lives (imports run one way: extramerge uses rivervalley, never the reverse):
    methods        the registry of merge methods (name, declared parameters, builder, needs-Gram)
    io/            readers per format (safetensors, torch files, io/dcp: DCP and Megatron torch_dist),
                   discovery, raw I/O, the writers (streamed, or byte ranges per rank), input/output policy
    distributed    torchrun/srun process groups: ranks, the byte split, agreement on failure
    engine/        the streaming weighted sum; trajectory/: the one-pass Gram matrix and `analyze`
    api            merge/plan/execute (the Gram matrix for methods that need one); plots: analysis figures
                   (every α rule lives in rivervalley.theory.alpha)
    eval/          held-out loss, cloze, the lm-evaluation-harness bridge, `extramerge eval`
    study/         predicted versus measured gain and the recommendation, `extramerge study`
    online/        SMA/EMA/power-EMA/Extra-Merge kept during training, swap-in, saving, HF callback
    lm/            the LM trainer (extra [lm]); cli: `extramerge`
"""

from __future__ import annotations

__all__ = ["merge", "analyze"]


def __getattr__(name):
    # Imported lazily so `import extramerge` stays cheap (torch is imported only when needed).
    if name in ("merge", "analyze"):
        from extramerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'extramerge' has no attribute {name!r}")
