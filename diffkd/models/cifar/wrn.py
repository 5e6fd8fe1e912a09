"""Wide ResNets of the benchmark: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (WRN-depth-width).

Pre-activation blocks (BN-ReLU-conv3×3-BN-ReLU-conv3×3) in three stages ``block1``-``block3`` of (depth − 4) / 6
blocks each, widths 16·k, 32·k, 64·k after a 3×3 stem of 16 channels.  A block whose width changes projects
its *activated* input with a 1×1 ``convShortcut``.  A final ``bn1`` + ReLU precede pooling; the last map is
8×8 on 32×32 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models.cifar._base import CifarNet, init_like_benchmark


class WideBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        # Present only when the width changes; the benchmark's name, so its checkpoints load.
        self.convShortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
                             if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage; the extra ``layer`` level reproduces the benchmark's key names (``block1.layer.0.bn1``)."""

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    def __init__(self, arch_name: str, depth: int, widen_factor: int, *, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__(arch_name, in_chans, num_classes)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"{arch_name}: depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks_per_stage, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(blocks_per_stage, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(blocks_per_stage, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_like_benchmark(self, linear="zero_bias")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))


WRN_ARCHS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def build_wrn(arch_name: str, **kwargs) -> WideResNet:
    depth, widen_factor = WRN_ARCHS[arch_name]
    return WideResNet(arch_name, depth, widen_factor, **kwargs)
