"""Building blocks of EfficientNetV2: conv-BN-act, squeeze-excitation, MBConv, Fused-MBConv. Module names
follow the reference PyTorch ports so that their state dicts load unchanged."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

BN_EPS = 1e-3
BN_MOMENTUM = 0.1
PADDINGS = ("symmetric", "same")


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's SAME padding, computed from the input size at run time: for a stride-2 conv
    on an even input the extra pixel goes right and bottom, as TF-trained weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBNAct(nn.Module):
    """conv (no bias; ``padding`` "symmetric", k//2 each side, or TF "same") → BatchNorm(eps 1e-3) → SiLU (or
    nothing when ``act=False``). Odd kernels only."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True, padding: str = "symmetric"):
        super().__init__()
        # at stride 1 with an odd kernel, TF SAME padding is exactly k//2 on every side
        conv = Conv2dSame if padding == "same" and stride > 1 else nn.Conv2d
        self.conv = conv(in_chs, out_chs, kernel, stride, 0 if conv is Conv2dSame else kernel // 2, groups=groups,
                         bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """Channel gating: mean over H, W → 1x1 conv → SiLU → 1x1 conv → sigmoid → multiply."""

    def __init__(self, chs: int, reduced_chs: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, reduced_chs, 1, bias=True)
        self.act = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_chs, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.conv_expand(self.act(self.conv_reduce(scale)))
        return x * scale.sigmoid()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand → kxk depthwise (stride) → SE → 1x1 project (+ residual)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, exp_ratio: int,
                 se_ratio: float, drop_path_rate: float = 0.0, padding: str = "symmetric"):
        super().__init__()
        mid_chs = in_chs * exp_ratio
        self.has_residual = stride == 1 and in_chs == out_chs
        self.expand_conv = ConvBNAct(in_chs, mid_chs, 1, padding=padding)
        self.dwconv = ConvBNAct(mid_chs, mid_chs, kernel, stride, groups=mid_chs, padding=padding)
        self.se = SqueezeExcite(mid_chs, int(in_chs * se_ratio)) if se_ratio > 0 else nn.Identity()
        self.project_conv = ConvBNAct(mid_chs, out_chs, 1, act=False, padding=padding)
        self.drop_path = StochasticDepth(drop_path_rate, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project_conv(self.se(self.dwconv(self.expand_conv(x))))
        return x + self.drop_path(out) if self.has_residual else out


class FusedMBConv(nn.Module):
    """Fused inverted residual: kxk conv (stride) expand → 1x1 project; with expansion 1 one kxk conv, named
    ``project_conv`` and keeping its activation, as in the reference ports."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, exp_ratio: int,
                 se_ratio: float = 0.0, drop_path_rate: float = 0.0, padding: str = "symmetric"):
        super().__init__()
        if se_ratio:
            raise ValueError("Fused-MBConv blocks of EfficientNetV2 have no squeeze-excitation")
        self.has_residual = stride == 1 and in_chs == out_chs
        if exp_ratio == 1:
            self.expand_conv = nn.Identity()
            self.project_conv = ConvBNAct(in_chs, out_chs, kernel, stride, padding=padding)
        else:
            mid_chs = in_chs * exp_ratio
            self.expand_conv = ConvBNAct(in_chs, mid_chs, kernel, stride, padding=padding)
            self.project_conv = ConvBNAct(mid_chs, out_chs, 1, act=False, padding=padding)
        self.drop_path = StochasticDepth(drop_path_rate, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project_conv(self.expand_conv(x))
        return x + self.drop_path(out) if self.has_residual else out


BLOCKS = {"M": MBConv, "F": FusedMBConv}
