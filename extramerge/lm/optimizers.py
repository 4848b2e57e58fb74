"""The trainer's optimizers: AdamW, or Muon on the hidden matrices plus AdamW on the rest, with each param
group's ``base_lr`` that the lr schedule scales every step."""

from __future__ import annotations

import torch

from .config import ResolvedConfig

__all__ = ["param_groups", "build_optimizers"]


def param_groups(model: torch.nn.Module, optimizer: str = "muon") -> dict[str, list[str]]:
    """Parameter names per group: ``muon`` (2-D hidden matrices: attention and MLP, GPT-2's Conv1D
    included; Muon only), ``decay`` (other tensors with >= 2 dims: embeddings, lm_head) and ``no_decay``
    (norms, biases). Embedding and output-embedding weights never go to Muon."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embeds.add(id(head.weight))
    out: dict[str, list[str]] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if optimizer == "muon" and p.ndim == 2 and id(p) not in embeds:
            out["muon"].append(name)
        else:
            out["decay" if p.ndim >= 2 else "no_decay"].append(name)
    return out


def build_optimizers(model: torch.nn.Module, r: ResolvedConfig) -> list[torch.optim.Optimizer]:
    """AdamW (decay on >= 2-D weights only), or Muon on the hidden matrices + AdamW on the rest. Every
    group remembers its ``base_lr``, which the schedule scales each step. Note: torch.optim.Muon runs its
    Newton-Schulz iteration in bfloat16, which is slow on CPUs without native bf16 support (the tiny preset's
    Muon step took ~0.1 s on one core of the dev machine, about as long as its forward + backward)."""
    params = dict(model.named_parameters())
    groups = param_groups(model, r.optimizer)
    fused = {"fused": True} if r.device.startswith("cuda") else {}
    adam_lr = r.lr if r.optimizer == "adamw" else r.adam_lr
    adam_groups = [
        {
            "params": [params[n] for n in groups["decay"]],
            "weight_decay": r.weight_decay,
            "base_lr": adam_lr,
        },
        {"params": [params[n] for n in groups["no_decay"]], "weight_decay": 0.0, "base_lr": adam_lr},
    ]
    adam = torch.optim.AdamW(
        [g for g in adam_groups if g["params"]], lr=adam_lr, betas=(r.beta1, r.beta2), eps=1e-8, **fused
    )
    if r.optimizer == "adamw":
        return [adam]
    muon = torch.optim.Muon(
        [{"params": [params[n] for n in groups["muon"]], "base_lr": r.lr}],
        lr=r.lr,
        weight_decay=r.weight_decay,
        momentum=r.muon_momentum,
        nesterov=True,
        adjust_lr_fn=r.muon_adjust_lr,
    )
    return [muon, adam]
