"""The inference form of an ``EfficientNetV2``: each eval-mode BatchNorm folded into its conv
(``torch.nn.utils.fusion``), one kernel and one pass over the activations fewer per conv."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layers import ConvBNAct
from .model import EfficientNetV2


@torch.no_grad()
def optimize_for_inference(model: EfficientNetV2, channels_last: bool = True,
                           device: str | torch.device | None = None,
                           dtype: torch.dtype | None = None) -> EfficientNetV2:
    """An eval-mode, gradient-free copy of ``model`` (unchanged), every BatchNorm folded into its conv: the same logits
    to float rounding. ``channels_last``: NHWC weights (feed it NHWC); ``device``, ``dtype`` move it after folding."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            # folded in float64 and rounded once: the weights stay as close to conv → BN as their dtype allows
            kept = module.conv.weight.dtype
            module.conv = fuse_conv_bn_eval(module.conv.double(), module.bn.double()).to(kept)
            module.bn = nn.Identity()
    fused.requires_grad_(False)
    fused.to(device=device, dtype=dtype)
    return fused.to(memory_format=torch.channels_last) if channels_last else fused
