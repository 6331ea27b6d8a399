"""Learning-rate schedule over optimizer steps (stepped once per step, never once per process as a
scheduler prepared by Accelerate would be): optional linear warmup, then cosine decay to ``lr * lrf``."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .errors import UsageError


def optimizer_steps_per_epoch(num_batches: int, grad_accum: int = 1) -> int:
    """Optimizer steps in an epoch of ``num_batches`` batches per process with ``grad_accum`` batches per
    step: Accelerate also steps at the loader's end (``sync_with_dataloader``), hence the ceiling."""
    if num_batches < 1 or grad_accum < 1:
        raise UsageError(f"need at least one batch and grad_accum >= 1 (--grad-accum), got {num_batches} and "
                         f"{grad_accum}")
    return math.ceil(num_batches / grad_accum)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, lrf: float = 0.01,
                    warmup_steps: int = 0) -> LambdaLR:
    """A ``LambdaLR``: ``(t + 1) / W`` for the first ``W = warmup_steps`` steps, then a cosine from 1 to ``lrf``.
    Not ``SequentialLR(LinearLR, ...)``: its warmup drifts by an ulp and its state is not plain JSON."""
    if total_steps < 1:
        raise UsageError(f"total_steps must be >= 1, got {total_steps} (--epochs/--max-steps)")
    if not 0 <= warmup_steps < total_steps:
        raise UsageError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps} "
                         f"(--warmup-epochs/--warmup-steps)")
    if not 0 <= lrf <= 1:
        raise UsageError(f"lrf (final lr / lr) must be in [0, 1], got {lrf} (--lrf)")
    decay_steps = total_steps - warmup_steps

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return ((1 + math.cos(math.pi * min(t - warmup_steps, decay_steps) / decay_steps)) / 2) * (1 - lrf) + lrf

    return LambdaLR(optimizer, factor)
