"""Online merging in a plain PyTorch loop: EMA, SMA and Extra-Merge kept every k steps, evaluated with the
merged weights swapped in, the best one saved.

    python -m examples.online_merge_plain            # prints the held-out loss of each, ~2 s on a CPU
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from extramerge.online import OnlineMerger


def main(steps: int = 400, every: int = 5, out: str | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    x, x_val = torch.randn(4096, 32), torch.randn(1024, 32)
    w_true = torch.randn(32, 1)
    y, y_val = x @ w_true + 0.5 * torch.randn(4096, 1), x_val @ w_true
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # a constant lr: the iterates stay noisy
    merger = OnlineMerger(model, "ema:0.9,sma:8,extra:0.5@4", every=every)

    def val_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x_val), y_val))

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (16,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        merger.update(step)  # an update every `every` steps

    losses = {"raw": val_loss()}
    for name in merger.ready_names():
        with merger.swapped(name):  # merged weights in; training weights back on exit
            losses[name] = val_loss()
    best = min((n for n in losses if n != "raw"), key=losses.get)
    folder = Path(out or tempfile.mkdtemp())
    merger.save(best, folder / f"{best}.safetensors", force=True)  # + its merge.json record
    for name, value in losses.items():
        print(f"{name:6s} val loss {value:.4f}")
    print(f"saved {best} to {folder / f'{best}.safetensors'}")
    return losses


if __name__ == "__main__":
    main(out=sys.argv[1] if len(sys.argv) > 1 else None)
