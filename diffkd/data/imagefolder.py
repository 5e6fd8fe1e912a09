"""ImageNet-style ImageFolder trees: `<root>/train/<class>/<image>` and `<root>/val/<class>/<image>`."""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision

from diffkd.data.in_memory import sample_keys

_LAYOUT = ("expected <data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image> with the same class "
           "folders in both (for ImageNet's validation set, move its 50,000 images into one folder per class "
           "first, e.g. with the widely used valprep.sh)")


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder over `<root>/train` or `<root>/val`, with reproducible augmentation.

    The transform of sample i in epoch e runs with the CPU generator seeded from (augment_seed, e, i) inside
    `torch.random.fork_rng`, so torchvision's random transforms draw the same parameters whatever the worker,
    batch or rank, and the caller's global RNG state is left untouched.
    """

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None, *,
                 augment_seed: int = 0):
        root = Path(root)
        split_dir = root / ("train" if train else "val")
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder: folder {root} does not exist; {_LAYOUT}")
        if not split_dir.is_dir():
            raise FileNotFoundError(f"ImageFolder: {split_dir} is missing; {_LAYOUT}")
        try:
            super().__init__(str(split_dir), transform=transform)
        except FileNotFoundError as error:  # no class folders, or a class folder without images
            raise FileNotFoundError(f"ImageFolder: {split_dir}: {error}; {_LAYOUT}") from error
        self.train = train
        self.augment_seed = int(augment_seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` uses."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            key = sample_keys(self.augment_seed, self.epoch, [index % len(self)])[0]
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(key & np.uint64(0x7FFFFFFFFFFFFFFF)))
                image = self.transform(image)
        return image, target

    def select(self, indices: Sequence[int] | torch.Tensor) -> ImageFolder:
        """A copy holding only the given samples (indices renumbered from 0)."""
        selected = copy.copy(self)
        selected.samples = [self.samples[int(i)] for i in indices]
        selected.imgs = selected.samples
        selected.targets = [target for _, target in selected.samples]
        return selected
