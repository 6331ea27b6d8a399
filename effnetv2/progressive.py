"""EfficientNetV2's progressive learning (Tan & Le, 2021, §4.2, Table 6): stage ``i`` of ``M`` starts at
epoch ``floor(i * E / M)`` with every setting at ``min + (max - min) * i / (M - 1)``. Ranges: the paper's for
s, m, l; L's for xl (the paper has no row); S's regularisation for b0..b3, with S's sizes scaled to the
variant's train size (b0: 82 → 192)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .configs import VARIANTS
from .errors import UsageError


@dataclass(frozen=True)
class ProgressiveRange:
    """(min, max) of each setting that progressive learning grows."""

    min_size: int
    max_size: int
    min_randaugment: float
    max_randaugment: float
    min_mixup: float
    max_mixup: float
    min_dropout: float
    max_dropout: float


RANGES: dict[str, ProgressiveRange] = {
    "s": ProgressiveRange(128, 300, 5, 15, 0.0, 0.0, 0.1, 0.3),
    "m": ProgressiveRange(128, 380, 5, 20, 0.0, 0.2, 0.1, 0.4),
    "l": ProgressiveRange(128, 380, 5, 25, 0.0, 0.4, 0.1, 0.5),
}
RANGES["xl"] = RANGES["l"]
RANGES.update({name: replace(RANGES["s"], min_size=round(cfg.train_size * 128 / 300), max_size=cfg.train_size)
               for name, cfg in VARIANTS.items() if name.startswith("b")})


@dataclass(frozen=True)
class Stage:
    """One stage of the plan: from ``start_epoch`` (0-based) on, train with these settings."""

    index: int
    start_epoch: int
    image_size: int
    randaugment: int
    mixup: float
    dropout: float

    def describe(self) -> str:
        return (f"progressive stage {self.index + 1}: from epoch {self.start_epoch + 1}, image size "
                f"{self.image_size}, RandAugment magnitude {self.randaugment}, mixup {self.mixup:.2f}, "
                f"dropout {self.dropout:.2f}")


def progressive_plan(variant: str, epochs: int, num_stages: int = 4, max_size: int | None = None) -> list[Stage]:
    """The ``num_stages`` stages for ``epochs`` epochs of ``variant``; ``max_size`` (``--image-size``) replaces the
    largest image size and scales the smallest alike (never below 16 px)."""
    if variant not in RANGES:
        raise UsageError(f"no progressive-learning plan for variant {variant!r}: choose one of {', '.join(RANGES)}")
    if num_stages < 1:
        raise UsageError(f"--stages must be at least 1, got {num_stages}")
    if epochs < num_stages:
        raise UsageError(f"--progressive with {num_stages} stages needs at least {num_stages} epochs, got "
                         f"--epochs {epochs}: raise --epochs or lower --stages")
    r = RANGES[variant]
    lo, hi = r.min_size, r.max_size
    if max_size:
        lo, hi = lo * max_size / hi, max_size

    def at(i: int, low: float, high: float) -> float:
        return low + (high - low) * (i / (num_stages - 1) if num_stages > 1 else 1.0)

    return [Stage(index=i, start_epoch=i * epochs // num_stages,
                  image_size=max(16, int(round(at(i, lo, hi)))),
                  randaugment=int(round(at(i, r.min_randaugment, r.max_randaugment))),
                  mixup=round(at(i, r.min_mixup, r.max_mixup), 4),
                  dropout=round(at(i, r.min_dropout, r.max_dropout), 4))
            for i in range(num_stages)]


def stage_for_epoch(plan: list[Stage], epoch: int) -> Stage:
    """The stage in force at (0-based) ``epoch``."""
    return [s for s in plan if s.start_epoch <= epoch][-1]
