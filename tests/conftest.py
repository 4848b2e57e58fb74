import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# torch.set_flush_denormal is process-wide and breaks hypothesis' float strategies, so simulation and
# training code scope it with rivervalley.common.resources.flush_denormals() instead of setting it here.

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is fastest, and immune to a busy shared machine (OpenMP waits otherwise)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
