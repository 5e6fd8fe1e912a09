"""What every network of the CIFAR zoo shares: the timm-style forward split and the benchmark's weight init.

Each network splits its forward like timm's models, ``forward_head(forward_features(x))``, so that the tap
finder of :mod:`diffkd.models.taps` treats the zoo and timm by one rule.  Global pooling is adaptive
everywhere: on 32×32 inputs it averages exactly the window the benchmark's fixed-kernel pools average (the
last map is as large as the benchmark's kernel), and it also accepts the 28×28 inputs of Fashion-MNIST,
where the fixed kernels would not fit.  ReLUs are never in-place, so a tapped tensor keeps its value.
"""
from __future__ import annotations

import torch
from torch import nn


class CifarNet(nn.Module):
    """Base class: ``forward = forward_head(forward_features(x))``.

    Subclasses build their layers, keep the benchmark's module and parameter names, and implement
    :meth:`forward_features`; ``pool_name`` and ``classifier_name`` name the parameter-free global pool and the
    classifier that :meth:`forward_head` applies.
    """

    pool_name = "avgpool"
    classifier_name = "fc"

    def __init__(self, arch_name: str, in_chans: int, num_classes: int):
        super().__init__()
        for what, value in (("in_chans", in_chans), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arch_name}: {what} must be a positive integer, got {value!r}")
        self.arch_name = arch_name
        self.in_chans = in_chans
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = getattr(self, self.pool_name)(features).flatten(1)
        return self.get_classifier()(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def extra_repr(self) -> str:
        return f"arch_name={self.arch_name!r}, in_chans={self.in_chans}, num_classes={self.num_classes}"


def init_like_benchmark(model: nn.Module, *, linear: str) -> None:
    """The benchmark's initialisation (it matters when a teacher or baseline is trained from scratch).

    Convolutions: normal with std √(2 / (k·k·out_channels)) (He, fan-out), bias zero.  BatchNorm: weight 1,
    bias 0.  Linear layers: ``linear="default"`` keeps PyTorch's init, ``"zero_bias"`` zeroes only the bias,
    ``"normal"`` draws weights from N(0, 0.01²) and zeroes the bias.
    """
    if linear not in ("default", "zero_bias", "normal"):
        raise ValueError(f"linear must be 'default', 'zero_bias' or 'normal', got {linear!r}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
