"""Fashion-MNIST from its four IDX files (as shipped by Debian's dataset-fashion-mnist package)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffkd.data.idx import read_idx
from diffkd.data.in_memory import InMemoryImageDataset, TensorImageTransform

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_FILE_STEMS = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HOW_TO_GET = (f"Install Debian's package (`apt-get install dataset-fashion-mnist`, which puts the files in "
               f"{DEFAULT_FASHION_MNIST_DIR}) or pass --data-dir with a folder holding "
               f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
               f"t10k-labels-idx1-ubyte.gz (gzipped or not).")


def _find_idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST: {root} has neither {stem}.gz nor {stem}. {_HOW_TO_GET}")


class FashionMNIST(InMemoryImageDataset):
    """Fashion-MNIST's training (60,000) or test (10,000) split: 1×28×28 uint8 images, 10 classes."""

    def __init__(self, root: str | Path = DEFAULT_FASHION_MNIST_DIR, train: bool = True,
                 transform: TensorImageTransform | None = None, *, augment_seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST: folder {root} does not exist. {_HOW_TO_GET}")
        images_path, labels_path = (_find_idx_file(root, stem) for stem in _FILE_STEMS[train])
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{images_path}: expected uint8 images of shape N×28×28, got {images.dtype} "
                             f"{images.shape}")
        if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(f"{labels_path}: expected {images.shape[0]} uint8 labels to match {images_path}, "
                             f"got {labels.dtype} {labels.shape}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{labels_path}: labels must be in 0..9, found {int(labels.max())}")
        super().__init__(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                         FASHION_MNIST_CLASSES, transform, augment_seed=augment_seed)
        self.root = root
        self.train = train

    @property
    def data(self) -> torch.Tensor:
        """The images as N×28×28 uint8 (torchvision's layout); a view of `images` (N×1×28×28)."""
        return self.images[:, 0]
