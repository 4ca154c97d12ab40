"""The learning-rate schedule: linear warmup, then constant or cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps, then
    ``constant``, or ``cosine`` decay (Loshchilov & Hutter 2017, "SGDR", without restarts) to
    ``min_lr_ratio * lr`` at ``total_steps`` (and held there). The schedule depends on the configured
    total, never on where a run stops, so a resumed run follows the same curve.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    floor = lr * min_lr_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
