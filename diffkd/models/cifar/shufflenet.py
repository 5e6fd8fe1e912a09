"""The benchmark's ShuffleNets: ShuffleV1 (groups 3, widths 240/480/960) and ShuffleV2 (net size 1×).

Both start with a 1×1 conv to 24 channels (no stride, no max-pool: CIFAR-sized inputs) and have three stages
``layer1``-``layer3`` that each halve the resolution, so the last map is 4×4 on 32×32 inputs.  The classifier
is ``linear``.  Both keep PyTorch's default initialisation, as the benchmark does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models.cifar._base import CifarNet

_STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: (g, C/g) → (C/g, g)."""
    return x.unflatten(1, (groups, x.shape[1] // groups)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1-BN-ReLU, channel shuffle, depthwise 3×3-BN, grouped 1×1-BN; then add (stride 1) or
    concatenate with a 3×3/2 average-pooled input (stride 2), and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        mid_channels = out_channels // 4
        # The first unit sees the 24-channel stem, which three groups would not divide evenly.
        self.first_groups = 1 if in_channels == _STEM_CHANNELS else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, kernel_size=3, stride=stride, padding=1,
                               groups=mid_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1))
        return F.relu(out + x)


class _ShuffleNet(CifarNet):
    """The stem (1×1 conv to 24 channels, BN, ReLU) and the three stages both versions share."""

    classifier_name = "linear"

    def __init__(self, arch_name: str, stage_widths: tuple[int, int, int], stage_blocks: tuple[int, int, int],
                 make_stage: Callable[[int, int, int], nn.Module], *, num_classes: int, in_chans: int):
        super().__init__(arch_name, in_chans, num_classes)
        self.conv1 = nn.Conv2d(in_chans, _STEM_CHANNELS, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels, stages = _STEM_CHANNELS, []
        for width, count in zip(stage_widths, stage_blocks):
            stages.append(make_stage(in_channels, width, count))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages

    def _stem_and_stages(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class ShuffleNetV1(_ShuffleNet):
    def __init__(self, arch_name: str, stage_widths: tuple[int, int, int], stage_blocks: tuple[int, int, int],
                 groups: int, *, num_classes: int = 100, in_chans: int = 3):
        def make_stage(in_channels: int, width: int, count: int) -> nn.Module:
            # The strided first unit concatenates its input, so its own branch makes only the difference.
            units = [ShuffleV1Unit(in_channels, width - in_channels, 2, groups)]
            units += [ShuffleV1Unit(width, width, 1, groups) for _ in range(count - 1)]
            return nn.Sequential(*units)

        super().__init__(arch_name, stage_widths, stage_blocks, make_stage, num_classes=num_classes,
                         in_chans=in_chans)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(stage_widths[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._stem_and_stages(x)


class ShuffleV2Unit(nn.Module):
    """Keeps half the channels, runs the other half through 1×1-BN-ReLU, depthwise 3×3-BN, 1×1-BN-ReLU,
    concatenates and shuffles (two groups)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([kept, branch], dim=1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: left depthwise 3×3/2-BN, 1×1-BN-ReLU; right 1×1-BN-ReLU, depthwise 3×3/2-BN, 1×1-BN-ReLU;
    concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class ShuffleNetV2(_ShuffleNet):
    def __init__(self, arch_name: str, stage_widths: tuple[int, int, int], stage_blocks: tuple[int, int, int],
                 last_channels: int, *, num_classes: int = 100, in_chans: int = 3):
        def make_stage(in_channels: int, width: int, count: int) -> nn.Module:
            return nn.Sequential(ShuffleV2DownUnit(in_channels, width), *[ShuffleV2Unit(width) for _ in range(count)])

        super().__init__(arch_name, stage_widths, stage_blocks, make_stage, num_classes=num_classes,
                         in_chans=in_chans)
        self.conv2 = nn.Conv2d(stage_widths[-1], last_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(last_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self._stem_and_stages(x))))


def build_shufflev1(arch_name: str, **kwargs) -> ShuffleNetV1:
    return ShuffleNetV1(arch_name, (240, 480, 960), (4, 8, 4), groups=3, **kwargs)


def build_shufflev2(arch_name: str, **kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(arch_name, (116, 232, 464), (3, 7, 3), last_channels=1024, **kwargs)
