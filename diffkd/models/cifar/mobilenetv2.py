"""The benchmark's MobileNetV2 (its ``mobile_half``: expansion 6, width multiplier 0.5).

A stride-2 3×3 stem ``conv1``, seven stages ``blocks.0``-``blocks.6`` of inverted residual blocks
(t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
(6, 320, 1, 1) with c scaled by the width, a 1×1 ``conv2`` to 1280 channels and ``classifier.0``.  Unlike
torchvision, every block, even t = 1, starts with its 1×1 expansion conv.  The last map is 2×2 on 32×32
inputs (the benchmark pools it with a 2×2 kernel, i.e. the same global mean).
"""
from __future__ import annotations

import torch
from torch import nn

from diffkd.models.cifar._base import CifarNet, init_like_benchmark

# (expansion t, output channels c, blocks n, first stride s) before width scaling; t = None means "expansion".
_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1))
_LAST_CHANNELS = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU())


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, depthwise 3×3-BN-ReLU, 1×1 project-BN (``conv.0`` … ``conv.7``); residual when shapes
    allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(CifarNet):
    classifier_name = "classifier"

    def __init__(self, arch_name: str, expansion: int = 6, width_mult: float = 0.5, *, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__(arch_name, in_chans, num_classes)
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, in_channels, 3, stride=2)
        stages = []
        for stage_expansion, channels, count, first_stride in _STAGES:
            out_channels = int(channels * width_mult)
            blocks = []
            for i in range(count):
                blocks.append(InvertedResidual(in_channels, out_channels, first_stride if i == 0 else 1,
                                               expansion if stage_expansion is None else stage_expansion))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        # The benchmark widens the last conv only for width multipliers above 1.
        last_channels = int(_LAST_CHANNELS * width_mult) if width_mult > 1.0 else _LAST_CHANNELS
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        init_like_benchmark(self, linear="normal")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.conv2(x)


def build_mobilenetv2(arch_name: str, **kwargs) -> CifarMobileNetV2:
    return CifarMobileNetV2(arch_name, expansion=6, width_mult=0.5, **kwargs)
