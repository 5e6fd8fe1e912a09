"""VGG networks of the benchmark (all with BatchNorm): vgg8, vgg11, vgg13, vgg16, vgg19.

Five conv blocks ``block0``-``block4`` (3×3 convs with bias, each followed by BN and ReLU, except that the last
ReLU of a block is applied outside it), max-pools ``pool0``-``pool3`` between blocks and an adaptive average
pool ``pool4`` before the 512 → classes ``classifier``.  As in the benchmark, ``pool3`` runs only for 64-pixel
high inputs, so a 32×32 input ends in a 4×4 map (and a 28×28 input in a 3×3 one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models.cifar._base import CifarNet, init_like_benchmark

VGG_ARCHS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

_POOL3_INPUT_HEIGHT = 64


def _conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv-BN-ReLU repeated, minus the final ReLU (indices 0 conv, 1 BN, 2 ReLU, 3 conv, … as in the benchmark)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(CifarNet):
    pool_name = "pool4"
    classifier_name = "classifier"

    def __init__(self, arch_name: str, block_widths: tuple[tuple[int, ...], ...], *, num_classes: int = 100,
                 in_chans: int = 3):
        super().__init__(arch_name, in_chans, num_classes)
        in_channels = in_chans
        for index, widths in enumerate(block_widths):
            self.add_module(f"block{index}", _conv_block(in_channels, widths))
            in_channels = widths[-1]
        for index in range(4):
            self.add_module(f"pool{index}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_like_benchmark(self, linear="normal")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        run_pool3 = x.shape[2] == _POOL3_INPUT_HEIGHT
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if run_pool3:
            x = self.pool3(x)
        return F.relu(self.block4(x))


def build_vgg(arch_name: str, **kwargs) -> CifarVGG:
    return CifarVGG(arch_name, VGG_ARCHS[arch_name], **kwargs)
