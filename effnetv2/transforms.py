"""torchvision transforms built from a model's preprocessing config."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision import transforms as T

if TYPE_CHECKING:
    from .model import EfficientNetV2

_MODES = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
          "bicubic": T.InterpolationMode.BICUBIC}


def transforms_for(model: EfficientNetV2 | dict, train: bool = False, image_size: int | None = None,
                   randaugment_magnitude: int | None = None,
                   scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """The transform a PIL image goes through before ``model`` sees it: → ``[3, S, S]`` float tensor.

    Eval: resize the short side to ``S / crop_pct``, centre crop ``S``, scale to [0, 1], normalise.
    Train: random resized crop to ``S`` (area share drawn from ``scale``, torchvision's default
    (0.08, 1); raise the lower end when a crop must keep the object, as for ``shapes``), horizontal
    flip, optional RandAugment, normalise.
    ``model`` may be an ``EfficientNetV2`` or its config dict; ``image_size`` overrides ``S``
    (default: the config's eval or train size).
    """
    cfg = model if isinstance(model, dict) else model.config
    mode = _MODES[cfg["interpolation"]]
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
