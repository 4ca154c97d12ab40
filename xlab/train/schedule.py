"""The schedules, functions of the optimizer step only (a resumed run follows the same curves): the
learning rate (linear warmup, then constant, cosine decay, or warmup-stable-decay to a floor) and
Muon's momentum warm-up."""

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
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps, then
    ``constant``, or ``cosine`` decay (Loshchilov & Hutter 2017, "SGDR", without restarts) to
    ``min_lr_ratio * lr`` at ``total_steps`` (and held there), or ``wsd``: constant, then a linear
    decay over the last ``decay_fraction`` of ``total_steps`` that reaches ``min_lr_ratio * lr`` at
    the last step. The schedule depends on the configured total, never on where a run stops, so a
    resumed run follows the same curve.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    floor = lr * min_lr_ratio
    if schedule == "wsd":
        # Warmup-stable-decay (Hu et al. 2024, "MiniCPM", arXiv:2404.06395; Hägele et al. 2024,
        # arXiv:2405.18392): lr until the last decay_fraction of total_steps, then linear to the floor.
        decay = max(1, round(total_steps * decay_fraction))
        start = total_steps - decay
        if step < start:
            return lr
        return lr + (floor - lr) * min(1.0, (step - start + 1) / decay)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, *, momentum: float, start: float, warmup_steps: int) -> float:
    """Muon's momentum at optimizer step ``step`` (0-based): linear from ``start`` at step 0 to
    ``momentum`` at ``warmup_steps`` and held there; ``momentum`` throughout when ``warmup_steps`` is 0.
    A low momentum early lets the first, large gradients pass quickly (Jordan et al. 2024,
    modded-nanogpt's records: 0.85 to 0.95 over 300 steps)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return momentum
    return start + (momentum - start) * step / warmup_steps
