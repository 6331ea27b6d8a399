"""The EfficientNetV2 family as data: one stage table per variant, the scaling rules, and in :data:`VARIANTS`
each variant's multipliers and preprocessing."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round a (scaled) channel count to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(channels + divisor / 2) // divisor * divisor)


@dataclass(frozen=True)
class StageConfig:
    """One stage: ``repeats`` blocks of one kind. The first takes ``stride`` and ``in_chs``."""

    repeats: int
    kernel: int
    stride: int
    exp_ratio: int
    in_chs: int
    out_chs: int
    block: str  # "F" = Fused-MBConv, "M" = MBConv
    se_ratio: float

    def scaled(self, width: float, depth: float) -> "StageConfig":
        """This stage with channels scaled by ``width`` and repeats by ``depth`` (ceil)."""
        return replace(
            self,
            repeats=int(math.ceil(self.repeats * depth)),
            in_chs=round_channels(self.in_chs * width),
            out_chs=round_channels(self.out_chs * width),
        )


def _stages(*rows: tuple) -> tuple[StageConfig, ...]:
    return tuple(StageConfig(*row) for row in rows)


_B0 = _stages(
    (1, 3, 1, 1, 32, 16, "F", 0.0),
    (2, 3, 2, 4, 16, 32, "F", 0.0),
    (2, 3, 2, 4, 32, 48, "F", 0.0),
    (3, 3, 2, 4, 48, 96, "M", 0.25),
    (5, 3, 1, 6, 96, 112, "M", 0.25),
    (8, 3, 2, 6, 112, 192, "M", 0.25),
)
_S = _stages(
    (2, 3, 1, 1, 24, 24, "F", 0.0),
    (4, 3, 2, 4, 24, 48, "F", 0.0),
    (4, 3, 2, 4, 48, 64, "F", 0.0),
    (6, 3, 2, 4, 64, 128, "M", 0.25),
    (9, 3, 1, 6, 128, 160, "M", 0.25),
    (15, 3, 2, 6, 160, 256, "M", 0.25),
)
_M = _stages(
    (3, 3, 1, 1, 24, 24, "F", 0.0),
    (5, 3, 2, 4, 24, 48, "F", 0.0),
    (5, 3, 2, 4, 48, 80, "F", 0.0),
    (7, 3, 2, 4, 80, 160, "M", 0.25),
    (14, 3, 1, 6, 160, 176, "M", 0.25),
    (18, 3, 2, 6, 176, 304, "M", 0.25),
    (5, 3, 1, 6, 304, 512, "M", 0.25),
)
_L = _stages(
    (4, 3, 1, 1, 32, 32, "F", 0.0),
    (7, 3, 2, 4, 32, 64, "F", 0.0),
    (7, 3, 2, 4, 64, 96, "F", 0.0),
    (10, 3, 2, 4, 96, 192, "M", 0.25),
    (19, 3, 1, 6, 192, 224, "M", 0.25),
    (25, 3, 2, 6, 224, 384, "M", 0.25),
    (7, 3, 1, 6, 384, 640, "M", 0.25),
)
_XL = _stages(
    (4, 3, 1, 1, 32, 32, "F", 0.0),
    (8, 3, 2, 4, 32, 64, "F", 0.0),
    (8, 3, 2, 4, 64, 96, "F", 0.0),
    (16, 3, 2, 4, 96, 192, "M", 0.25),
    (24, 3, 1, 6, 192, 256, "M", 0.25),
    (32, 3, 2, 6, 256, 512, "M", 0.25),
    (8, 3, 1, 6, 512, 640, "M", 0.25),
)


@dataclass(frozen=True)
class VariantConfig:
    """A named member of the family: base stage table, multipliers and its preprocessing."""

    stages: tuple[StageConfig, ...]
    train_size: int
    eval_size: int
    dropout: float
    width: float = 1.0
    depth: float = 1.0
    num_features: int = 1280

    def scaled_stages(self) -> list[StageConfig]:
        return [stage.scaled(self.width, self.depth) for stage in self.stages]

    @property
    def stem_chs(self) -> int:
        return self.scaled_stages()[0].in_chs

    @property
    def head_chs(self) -> int:
        return round_channels(self.num_features * self.width)


VARIANTS: dict[str, VariantConfig] = {
    "b0": VariantConfig(_B0, 192, 224, 0.2),
    "b1": VariantConfig(_B0, 192, 240, 0.2, width=1.0, depth=1.1),
    "b2": VariantConfig(_B0, 208, 260, 0.3, width=1.1, depth=1.2),
    "b3": VariantConfig(_B0, 240, 300, 0.3, width=1.2, depth=1.4),
    "s": VariantConfig(_S, 300, 384, 0.2),
    "m": VariantConfig(_M, 384, 480, 0.3),
    "l": VariantConfig(_L, 384, 480, 0.4),
    "xl": VariantConfig(_XL, 384, 512, 0.4),
}


def get_variant(name: str) -> VariantConfig:
    """Look up a variant by name ("b0".."b3", "s", "m", "l", "xl"), with a clear error otherwise."""
    key = str(name).lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown EfficientNetV2 variant {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


def normalise_labels(id2label: dict | None, label2id: dict | None,
                     num_classes: int) -> tuple[dict[str, str], dict[str, int]]:
    """Labels as stored in ``config.json``: ``{"0": name}`` and ``{name: 0}``, checked against
    ``num_classes``. Missing labels default to the class index."""
    if id2label is None:
        id2label = {i: str(i) for i in range(num_classes)}
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict of class index → name, got {type(id2label).__name__}")
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"id2label keys must be class indices (0..{num_classes - 1})") from None
    if sorted(labels) != list(range(num_classes)):
        raise ValueError(f"id2label has {len(labels)} labels with indices {sorted(labels)[:5]}..., but "
                         f"num_classes={num_classes}: give one label for each index 0..{num_classes - 1}")
    id2label = {str(i): labels[i] for i in range(num_classes)}
    derived = {name: int(i) for i, name in id2label.items()}
    if len(derived) != num_classes:
        raise ValueError("id2label has duplicate class names: every class needs its own name")
    if label2id is not None and {str(k): v for k, v in label2id.items()} != derived:
        raise ValueError("label2id does not match id2label: drop label2id, it is derived from id2label")
    return id2label, derived
