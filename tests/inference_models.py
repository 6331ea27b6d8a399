"""Models for the inference tests whose outputs are large enough for numerical differences to show.

A freshly initialised EfficientNetV2 has BatchNorm at identity and a classifier of std 0.01: its
signal fades block after block, the logits are ~1e-6 and hardly depend on the input, so almost any
error would pass a 1e-4 check. Here the BatchNorm statistics are measured on random images (as
training would), the BatchNorm affine parameters are random, and the classifier is scaled to give
logits of order 1-5 that differ from image to image.
"""
from __future__ import annotations

import torch
from torch import nn

from effnetv2 import EfficientNetV2


@torch.no_grad()
def realistic_model(variant: str = "b0", num_classes: int = 7, image_size: int = 64, seed: int = 0,
                    **kwargs) -> EfficientNetV2:
    """An eval-mode model with trained-looking BatchNorm statistics and labels ``class_0 ...``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = EfficientNetV2(variant, num_classes=num_classes, image_size=image_size, drop_path_rate=0.0,
                           id2label={i: f"class_{i}" for i in range(num_classes)}, **kwargs)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):  # the scale these checks were set for
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", generator=generator)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    model(torch.randn(16, 3, image_size, image_size, generator=generator))
    for bn in norms:
        bn.momentum = 0.1
    classifier = model.head.classifier
    classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) / classifier.in_features ** 0.5)
    classifier.bias.copy_(torch.randn(num_classes, generator=generator) * 0.1)
    return model.eval()
