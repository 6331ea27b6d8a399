"""Learning-rate schedule: optional linear warmup, then cosine decay from ``lr`` to ``lr * lrf``."""
from __future__ import annotations

import math

import torch


def cosine_factor(step: int, total_steps: int, lrf: float = 0.01, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps``; then, with ``t`` counted
    from the end of warmup over ``T = total_steps - warmup_steps``:
    ``((1 + cos(pi * t / T)) / 2) * (1 - lrf) + lrf`` — 1 at the start, ``lrf`` at the end.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, decay_steps)
    return ((1 + math.cos(math.pi * t / decay_steps)) / 2) * (1 - lrf) + lrf


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, lrf: float = 0.01,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`cosine_factor`; call ``.step()`` once per optimizer step."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps, lrf, warmup_steps))
