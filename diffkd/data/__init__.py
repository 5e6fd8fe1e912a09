"""Datasets and loaders: Fashion-MNIST (IDX files), CIFAR-100 (python format, read safely), ImageFolder trees.

Typical use::

    train_ds, val_ds, info = build_datasets("cifar100", "/data", augment_seed=seed)
    train_loader = build_loader(train_ds, 64, train=True, seed=seed, distributed=ddp)
    for epoch in range(start_epoch, epochs):
        train_loader.sampler.set_epoch(epoch)   # order and augmentation of this epoch, also without DDP
        ...
"""
from diffkd.data.cifar import CIFAR100, load_restricted_pickle
from diffkd.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, FashionMNIST
from diffkd.data.idx import read_idx
from diffkd.data.imagefolder import ImageFolder
from diffkd.data.in_memory import InMemoryImageDataset, TensorImageTransform, sample_keys
from diffkd.data.loaders import EpochShuffleSampler, ShardSampler, build_loader, subset
from diffkd.data.recipes import (CIFAR100_MEAN, CIFAR100_STD, DATASET_NAMES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                 IMAGENET_MEAN, IMAGENET_STD, build_datasets)

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "DATASET_NAMES",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "read_idx", "load_restricted_pickle", "FashionMNIST", "CIFAR100", "ImageFolder",
    "InMemoryImageDataset", "TensorImageTransform", "sample_keys",
    "EpochShuffleSampler", "ShardSampler", "build_loader", "subset", "build_datasets",
]
