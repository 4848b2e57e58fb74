"""Property: an SMA merge of real checkpoint files does not depend on the order of the checkpoints inside
its window (THEORY.md invariant 3), and checkpoints outside the window do not matter at all."""

import tempfile
from pathlib import Path

import numpy as np
import torch
from _ckpt_factory import load_state, make_safetensors_files
from hypothesis import given, settings
from hypothesis import strategies as st

from extramerge.engine import merge_weights
from extramerge.io import open_checkpoint
from rivervalley import weights as W


@settings(max_examples=12, deadline=None)
@given(n=st.integers(3, 6), data=st.data())
def test_sma_is_invariant_to_order_inside_its_window(n, data):
    K = data.draw(st.integers(2, n), label="window")
    perm = data.draw(st.permutations(range(n - K, n)), label="order inside the window")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_safetensors_files(tmp / "in", n=n, seed=n * 10 + K)
        ckpts = [open_checkpoint(p) for p in paths]
        w = W.sma(n, K)
        merge_weights(ckpts, w, tmp / "a.safetensors", progress=False)
        shuffled = ckpts[: n - K] + [ckpts[i] for i in perm]
        # the oldest checkpoints (weight 0) are replaced by the newest one: they must not matter either
        shuffled[: n - K] = [ckpts[-1]] * (n - K)
        merge_weights(shuffled, w, tmp / "b.safetensors", progress=False)
        a, b = load_state(tmp / "a.safetensors"), load_state(tmp / "b.safetensors")
        ref = {k: sum(load_state(p)[k].double() for p in paths[n - K :]) / K for k in a}
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(a[k].double().numpy(), ref[k].numpy(), rtol=1e-5, atol=1e-6)
            else:  # integer buffers are copied from the newest checkpoint of each list, never averaged
                assert torch.equal(a[k], load_state(ckpts[-1].path)[k])
                assert torch.equal(b[k], load_state(shuffled[-1].path)[k])
        for c in ckpts:
            c.close()
