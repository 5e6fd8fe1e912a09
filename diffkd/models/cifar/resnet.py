"""CIFAR ResNets of the benchmark: resnet8 … resnet110, resnet8x4, resnet32x4 and ResNet50.

resnetN (N = 6n + 2) has a 3×3 stem and three stages of n basic blocks (widths 16/16/32/64, or 32/64/128/256 for
the ×4 variants); a block whose stride or width changes gets a ``downsample`` (1×1 conv + BN) shortcut.  The
last map is 8×8 on 32×32 inputs.  ``ResNet50`` is the benchmark's other ResNet family ("resnetv2"): a 3×3 stem
without pooling, four stages of bottleneck blocks with ``shortcut`` projections and a ``linear`` classifier;
its last map is 4×4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models.cifar._base import CifarNet, init_like_benchmark


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = _projection(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(CifarNet):
    """The benchmark's ``resnet.py``: stem, ``layer1``-``layer3`` of basic blocks, ``fc``."""

    def __init__(self, arch_name: str, depth: int, widths: tuple[int, int, int, int], *, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__(arch_name, in_chans, num_classes)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"{arch_name}: depth must be 6n + 2 for basic blocks, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_channels = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [BasicBlock(in_channels if i == 0 else width, width, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_like_benchmark(self, linear="default")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, each with BN; (projected) input added, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        # The benchmark keeps an empty Sequential when no projection is needed: same (empty) state dict.
        self.shortcut = _projection(in_channels, out_channels, stride) if needs_projection else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(CifarNet):
    """The benchmark's ``resnetv2.py`` (its ResNet50 teacher): stem, ``layer1``-``layer4``, ``linear``."""

    classifier_name = "linear"

    def __init__(self, arch_name: str, blocks_per_stage: tuple[int, int, int, int], *, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__(arch_name, in_chans, num_classes)
        self.conv1 = _conv3x3(in_chans, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        stages = []
        in_channels = 64
        for width, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks_per_stage):
            blocks = []
            for i in range(count):
                blocks.append(Bottleneck(in_channels, width, stride if i == 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)
        init_like_benchmark(self, linear="default")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


_SMALL = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

RESNET_ARCHS = {
    **{f"resnet{depth}": (depth, _SMALL) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}


def build_resnet(arch_name: str, **kwargs) -> CifarResNet:
    depth, widths = RESNET_ARCHS[arch_name]
    return CifarResNet(arch_name, depth, widths, **kwargs)


def build_resnet50(arch_name: str, **kwargs) -> CifarResNetV2:
    return CifarResNetV2(arch_name, (3, 4, 6, 3), **kwargs)
