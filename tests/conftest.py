import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# torch.set_flush_denormal is process-wide and breaks hypothesis' float strategies, so simulation and
# training code scope it with rivervalley._compute.flush_denormals() instead of setting it here.
