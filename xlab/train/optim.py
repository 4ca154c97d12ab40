"""The optimizer: AdamW (Loshchilov & Hutter 2019) with weight decay on weight matrices only."""

from __future__ import annotations

import torch
import torch.nn as nn

from xlab.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices, none on biases, norms and embeddings.

    A parameter decays when it has two or more dimensions and does not belong to an ``nn.Embedding``
    (a tied output head shares the embedding's tensor and so does not decay either).
    """
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in emb else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` with ``t.lr``, ``t.beta1``, ``t.beta2``, ``t.weight_decay``; the
    fused kernel where torch has one for ``device`` (CUDA, and CPU since torch 2.4)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        impl = {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        impl = {}
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), **impl)
