"""The CIFAR zoo of the common distillation benchmark (CRD / RepDistiller), by the benchmark's names.

Module and parameter names follow the benchmark exactly, so its teacher checkpoints (weights under
``"model"``) load strictly.  Every network takes ``num_classes`` (default 100) and ``in_chans`` (default 3)
and runs on 32×32 and 28×28 inputs.
"""
from __future__ import annotations

from typing import Callable

from diffkd.models.cifar._base import CifarNet
from diffkd.models.cifar.mobilenetv2 import build_mobilenetv2
from diffkd.models.cifar.resnet import RESNET_ARCHS, build_resnet, build_resnet50
from diffkd.models.cifar.shufflenet import build_shufflev1, build_shufflev2
from diffkd.models.cifar.vgg import VGG_ARCHS, build_vgg
from diffkd.models.cifar.wrn import WRN_ARCHS, build_wrn

CIFAR_BUILDERS: dict[str, Callable[..., CifarNet]] = {
    **{name: build_resnet for name in RESNET_ARCHS},
    "ResNet50": build_resnet50,
    **{name: build_wrn for name in WRN_ARCHS},
    **{name: build_vgg for name in VGG_ARCHS},
    "MobileNetV2": build_mobilenetv2,
    "ShuffleV1": build_shufflev1,
    "ShuffleV2": build_shufflev2,
}

__all__ = ["CIFAR_BUILDERS", "CifarNet"]
