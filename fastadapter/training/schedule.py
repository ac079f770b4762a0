"""The learning-rate schedule: linear warmup from 0, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): ``(step + 1) / warmup_steps`` during
    warmup (the first step already learns), then a half cosine from 1 down to ``min_ratio`` at
    ``total_steps``.

    Use with ``torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, ...))``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
