"""torchvision transforms built from a model's preprocessing config."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision import transforms as T

if TYPE_CHECKING:
    from .model import EfficientNetV2


def transforms_for(model: EfficientNetV2 | dict, train: bool = False, image_size: int | None = None,
                   randaugment_magnitude: int | None = None,
                   scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """PIL image → ``[3, S, S]`` normalised float tensor for ``model`` (an ``EfficientNetV2`` or its config).
    Eval: resize the short side to ``S / crop_pct``, centre crop ``S``. Train: random resized crop (area share
    from ``scale``), horizontal flip, optional RandAugment. ``image_size`` overrides the config's ``S``."""
    cfg = model if isinstance(model, dict) else model.config
    mode = T.InterpolationMode(cfg["interpolation"])
    normalise = [T.PILToTensor(), T.ConvertImageDtype(torch.float), T.Normalize(cfg["mean"], cfg["std"])]
    if train:
        size = image_size or cfg["train_image_size"]
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        augment = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=mode, antialias=True),
                   T.RandomHorizontalFlip()]
        if randaugment_magnitude:
            augment.append(T.RandAugment(magnitude=int(randaugment_magnitude), interpolation=mode))
        return T.Compose(augment + normalise)
    size = image_size or cfg["image_size"]
    resize = int(size / cfg["crop_pct"])
    return T.Compose([T.Resize(resize, interpolation=mode, antialias=True), T.CenterCrop(size)] + normalise)
