"""The inference-optimised form of an ``EfficientNetV2``: BatchNorm folded into the convolutions.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one conv with
scaled weights and a bias. Folding removes a kernel launch and a full pass over every activation
per conv, which is most of what separates a fused graph from eager PyTorch on a CPU.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layers import ConvBNAct

if TYPE_CHECKING:
    from .model import EfficientNetV2


@torch.no_grad()
def optimize_for_inference(model: EfficientNetV2, channels_last: bool = True,
                           device: str | torch.device | None = None,
                           dtype: torch.dtype | None = None) -> EfficientNetV2:
    """An eval-mode, gradient-free copy of ``model`` with every BatchNorm folded into its conv.

    ``model`` itself is never changed. The copy keeps the whole ``EfficientNetV2`` API
    (``forward_features``, ``attention_maps``, ...) and gives the same logits ``[B, num_classes]``
    to float rounding. ``channels_last`` stores the weights NHWC, the layout oneDNN and cuDNN
    convolve fastest (feed it ``x.contiguous(memory_format=torch.channels_last)``); ``device`` and
    ``dtype`` (e.g. ``"cuda"``, ``torch.bfloat16``) move the copy after folding.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            # folded in float64 and rounded once: the weights stay as close to conv → BN as their dtype allows
            kept = module.conv.weight.dtype
            module.conv = fuse_conv_bn_eval(module.conv.double(), module.bn.double()).to(kept)
            module.bn = nn.Identity()
    leftover = [name for name, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise ValueError(f"BatchNorm layers outside a conv-BN pair cannot be folded: {leftover[:3]}")
    for param in fused.parameters():
        param.requires_grad_(False)
    fused.to(device=device, dtype=dtype)
    return fused.to(memory_format=torch.channels_last) if channels_last else fused
