"""EfficientNetV2's progressive learning (Tan & Le, 2021, §4): training is cut into stages; early
stages use small images and weak regularisation, later ones large images and strong regularisation,
both interpolated linearly from (min) to (max)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProgressiveRange:
    min_size: int
    max_size: int
    min_randaugment: float
    max_randaugment: float
    min_mixup: float
    max_mixup: float
    min_dropout: float
    max_dropout: float


# The paper's Table 6 settings. The b-variants use S's regularisation with sizes scaled to their own
# train size; xl uses L's (the paper gives no separate row for them).
_S = ProgressiveRange(128, 300, 5, 15, 0.0, 0.0, 0.1, 0.3)
_M = ProgressiveRange(128, 380, 5, 20, 0.0, 0.2, 0.1, 0.4)
_L = ProgressiveRange(128, 380, 5, 25, 0.0, 0.4, 0.1, 0.5)
RANGES = {"s": _S, "m": _M, "l": _L, "xl": _L,
          "b0": ProgressiveRange(96, 192, 5, 15, 0.0, 0.0, 0.1, 0.3),
          "b1": ProgressiveRange(96, 192, 5, 15, 0.0, 0.0, 0.1, 0.3),
          "b2": ProgressiveRange(104, 208, 5, 15, 0.0, 0.0, 0.1, 0.3),
          "b3": ProgressiveRange(120, 240, 5, 15, 0.0, 0.0, 0.1, 0.3)}


@dataclass(frozen=True)
class Stage:
    index: int
    start_epoch: int
    image_size: int
    randaugment: int
    mixup: float
    dropout: float

    def describe(self) -> str:
        return (f"stage {self.index + 1}: from epoch {self.start_epoch + 1}, image size {self.image_size}, "
                f"RandAugment magnitude {self.randaugment}, mixup {self.mixup:.2f}, dropout {self.dropout:.2f}")

    def as_dict(self) -> dict:
        return asdict(self)


def progressive_plan(variant: str, epochs: int, num_stages: int = 4, max_size: int | None = None) -> list[Stage]:
    """The ``num_stages`` stages for ``epochs`` epochs of ``variant``.

    Stage ``i`` of ``M`` takes ``value = min + (max - min) * i / (M - 1)`` for every setting and starts
    at epoch ``floor(i * epochs / M)``. ``max_size`` (e.g. a small ``--image-size`` for a smoke run)
    replaces the largest size and scales the smallest by the same factor.
    """
    if variant not in RANGES:
        raise ValueError(f"no progressive-learning plan for variant {variant!r}: choose one of {', '.join(RANGES)}")
    if num_stages < 1 or epochs < num_stages:
        raise ValueError(f"--progressive needs at least as many epochs ({epochs}) as stages ({num_stages})")
    r = RANGES[variant]
    lo, hi = r.min_size, r.max_size
    if max_size:
        lo, hi = lo * max_size / hi, max_size

    def at(i: int, a: float, b: float) -> float:
        return a + (b - a) * (i / (num_stages - 1) if num_stages > 1 else 1.0)

    return [Stage(index=i, start_epoch=i * epochs // num_stages,
                  image_size=max(16, int(round(at(i, lo, hi)))),
                  randaugment=int(round(at(i, r.min_randaugment, r.max_randaugment))),
                  mixup=round(at(i, r.min_mixup, r.max_mixup), 4),
                  dropout=round(at(i, r.min_dropout, r.max_dropout), 4))
            for i in range(num_stages)]


def stage_for_epoch(plan: list[Stage], epoch: int) -> Stage:
    """The stage in force at (0-based) ``epoch``."""
    return [s for s in plan if s.start_epoch <= epoch][-1]
