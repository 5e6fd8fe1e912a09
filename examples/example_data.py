"""Training batches for the examples: Fashion-MNIST (as Debian's dataset-fashion-mnist package installs it) or
random images, so that every example runs on a machine without any download."""
from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from diffkd.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST, TensorImageTransform
from diffkd.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR

NUM_CLASSES = 10  # Fashion-MNIST's; the random data draw labels from as many classes


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=("fashion-mnist", "random"), default="fashion-mnist",
                        help="training images: Fashion-MNIST (default) or random noise with random labels")
    parser.add_argument("--data-dir", default=DEFAULT_FASHION_MNIST_DIR,
                        help="the folder with Fashion-MNIST's IDX files (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)


def image_shape(args: argparse.Namespace, channels: int) -> tuple[int, int, int]:
    """(C, H, W) of the batches :func:`batches` yields for models that take ``channels`` channels."""
    return (channels, 28, 28) if args.data == "fashion-mnist" else (channels, 32, 32)


def batches(args: argparse.Namespace, steps: int, channels: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` training batches of (images, labels); Fashion-MNIST's gray images are repeated to ``channels``."""
    shape = image_shape(args, channels)
    if args.data == "random":
        for _ in range(steps):
            yield (torch.randn(args.batch_size, *shape, device=device),
                   torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device))
        return
    transform = TensorImageTransform(FASHION_MNIST_MEAN, FASHION_MNIST_STD, crop_padding=2, horizontal_flip=True)
    loader = DataLoader(FashionMNIST(args.data_dir, train=True, transform=transform), batch_size=args.batch_size,
                        shuffle=True, drop_last=True)
    step = 0
    while True:
        for images, labels in loader:
            if step == steps:
                return
            yield images.expand(-1, channels, -1, -1).to(device), labels.to(device)
            step += 1
