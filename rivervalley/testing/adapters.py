"""Check merge code that works on state dicts, not arrays: :func:`state_dict_merge` adapts it.

Real merge code takes a list of checkpoints as state dicts (name → tensor, oldest first) and returns one
state dict. The checks of :mod:`rivervalley.testing` feed arrays ``[n, p]``; the adapter splits each row
into the floating tensors of a template state dict (same names and shapes, in the array's dtype), copies
the template's other entries (integer buffers, step counters) unchanged into every checkpoint, calls the
merge, and concatenates its floating outputs back into ``[p]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

__all__ = ["state_dict_merge"]


def state_dict_merge(fn: Callable, template: Mapping) -> Callable:
    """Wrap ``fn(list_of_state_dicts) -> state_dict`` as ``fn([n, p] torch tensor) -> [p]``.

    ``template``: a state dict whose floating tensors give the names and shapes (p is their total number of
    elements, in the template's order); its other entries are passed through as they are. Use with
    ``backend='torch'``; the returned function's ``p`` attribute is the number of coordinates to give the
    checks, e.g. ``check_affine_merge(f, n, p=f.p, backend='torch')``.
    """
    import torch

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    floats = [
        (k, tuple(v.shape)) for k, v in template.items() if torch.is_tensor(v) and v.is_floating_point()
    ]
    if not floats:
        raise ValueError("template has no floating tensors to merge")
    others = {k: v for k, v in template.items() if not (torch.is_tensor(v) and v.is_floating_point())}
    sizes = [math.prod(shape) for _, shape in floats]

    def merge(x):
        if not torch.is_tensor(x):
            raise TypeError("state_dict_merge needs backend='torch' (the checks then pass torch tensors)")
        states = []
        for row in x:
            parts = torch.split(row, sizes)
            state = {name: part.reshape(shape) for (name, shape), part in zip(floats, parts, strict=True)}
            states.append(
                {**state, **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in others.items()}}
            )
        out = fn(states)
        missing = [name for name, _ in floats if name not in out]
        if missing:
            raise KeyError(f"the merged state dict lacks {missing[:3]}")
        return torch.cat([torch.as_tensor(out[name]).reshape(-1).to(x.dtype) for name, _ in floats])

    merge.p = sum(sizes)
    merge.__qualname__ = getattr(fn, "__qualname__", "state_dict_merge")
    return merge
