"""Learning-rate schedule: optional linear warmup, then cosine decay from ``lr`` to ``lr * lrf``.

The schedule counts optimizer steps, not batches: with gradient accumulation over ``k`` batches and
``N`` processes, one optimizer step consumes ``k * N`` batches, and the scheduler is stepped once per
optimizer step (never ``N`` times, as a scheduler prepared by Accelerate would be).
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def optimizer_steps_per_epoch(num_batches: int, grad_accum: int = 1) -> int:
    """Optimizer steps in one epoch of ``num_batches`` batches (per process, i.e. ``len`` of the
    loader prepared by Accelerate) with ``grad_accum`` batches per step.

    Accelerate also steps at the end of the data loader (``sync_with_dataloader``), so a last partial
    accumulation counts as a step: ``ceil(num_batches / grad_accum)``.
    """
    if num_batches < 1 or grad_accum < 1:
        raise ValueError(f"need at least one batch and grad_accum >= 1, got {num_batches} and {grad_accum}")
    return math.ceil(num_batches / grad_accum)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, lrf: float = 0.01,
                    warmup_steps: int = 0) -> LambdaLR:
    """A ``LambdaLR`` whose multiplier at optimizer step ``t`` (call ``.step()`` once per optimizer step) is
    ``(t + 1) / W`` for the first ``W = warmup_steps``, then ``((1 + cos(pi * t' / T)) / 2) * (1 - lrf) + lrf``
    with ``t'`` counted from the end of warmup over ``T = total_steps - W``: 1 at the start, ``lrf`` from ``T`` on.

    One closed form, not ``SequentialLR(LinearLR, ...)``, whose recursive warmup drifts by an ulp. Its
    ``state_dict()`` holds only numbers (the lambda is rebuilt from the arguments), so a checkpoint can keep
    it as JSON.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    if not 0 <= lrf <= 1:
        raise ValueError(f"lrf (final lr / lr) must be in [0, 1], got {lrf}")
    decay_steps = total_steps - warmup_steps

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return ((1 + math.cos(math.pi * min(t - warmup_steps, decay_steps) / decay_steps)) / 2) * (1 - lrf) + lrf

    return LambdaLR(optimizer, factor)
