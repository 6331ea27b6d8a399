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


# Stage by stage, every variant has the same stride, expansion and block kind (Fused-MBConv "F" without SE,
# MBConv "M" with SE ratio 0.25) and kernel 3; the variants differ in repeats and widths.
_STRIDES, _EXPANSIONS, _KINDS = (1, 2, 2, 2, 1, 2, 1), (1, 4, 4, 4, 6, 6, 6), "FFFMMMM"


def _stages(stem_chs: int, *stages: tuple[int, int]) -> tuple[StageConfig, ...]:
    """The stage table from the stem width and each stage's ``(repeats, out_chs)`` (in_chs: the previous out_chs)."""
    in_chs = (stem_chs,) + tuple(out_chs for _, out_chs in stages)
    return tuple(StageConfig(repeats, 3, _STRIDES[i], _EXPANSIONS[i], in_chs[i], out_chs, _KINDS[i],
                             0.25 if _KINDS[i] == "M" else 0.0) for i, (repeats, out_chs) in enumerate(stages))


_B0 = _stages(32, (1, 16), (2, 32), (2, 48), (3, 96), (5, 112), (8, 192))
_S = _stages(24, (2, 24), (4, 48), (4, 64), (6, 128), (9, 160), (15, 256))
_M = _stages(24, (3, 24), (5, 48), (5, 80), (7, 160), (14, 176), (18, 304), (5, 512))
_L = _stages(32, (4, 32), (7, 64), (7, 96), (10, 192), (19, 224), (25, 384), (7, 640))
_XL = _stages(32, (4, 32), (8, 64), (8, 96), (16, 192), (24, 256), (32, 512), (8, 640))


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
