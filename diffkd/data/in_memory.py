"""Small image datasets held in memory as one uint8 tensor, augmented a batch at a time with torch ops.

Augmentation randomness is counter-based: the crop offsets and flip of a sample are a pure function of
(augment_seed, epoch, index), computed with the splitmix64 mixer. So a sample's augmentation does not depend
on the batch it lands in, the number of DataLoader workers, the number of ranks or the global RNG state, and a
resumed run replays any epoch exactly: set the epoch (`dataset.set_epoch`, which the training sampler's
`set_epoch` calls) and the same images come out.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

_UINT64_MOD = 1 << 64


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic): a cheap, well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        values = values + np.uint64(0x9E3779B97F4A7C15)
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """One 64-bit random key per sample index, a pure function of (seed, epoch, index)."""
    run_key = _splitmix64(np.array([seed % _UINT64_MOD], dtype=np.uint64))
    epoch_key = _splitmix64(run_key ^ np.uint64(epoch % _UINT64_MOD))
    return _splitmix64(epoch_key ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


class TensorImageTransform:
    """Batched transform of uint8 B×C×H×W images to normalised float32 B×C×H×W.

    Optionally a random crop of the original size from the image zero-padded by `crop_padding` pixels (as
    torchvision's `RandomCrop(size, padding)`) and a random horizontal flip (probability 1/2), both with
    per-sample parameters taken from the sample keys; then `(x / 255 - mean) / std` per channel.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop_padding: int = 0,
                 horizontal_flip: bool = False):
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)} values")
        if any(value <= 0 for value in std):
            raise ValueError(f"std values must be > 0, got {tuple(std)}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        std_tensor = torch.tensor(self.std).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_tensor)
        self._shift = -torch.tensor(self.mean).view(1, -1, 1, 1) / std_tensor

    @property
    def is_random(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
                f"horizontal_flip={self.horizontal_flip})")

    def __call__(self, images: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 B×C×H×W images, got {images.dtype} of shape {tuple(images.shape)}")
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {len(self.mean)} values")
        if self.is_random:
            images = self._crop_and_flip(images, keys)
        return images.float().mul_(self._scale).add_(self._shift)

    def _crop_and_flip(self, images: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        batch, channels, height, width = images.shape
        pad = self.crop_padding
        padded = images.new_zeros(batch, channels, height + 2 * pad, width + 2 * pad)
        padded[:, :, pad:pad + height, pad:pad + width] = images
        # Disjoint bit fields of each key: 20 bits per crop offset (modulo bias < 1e-5), the top bit for the flip.
        low_bits = torch.from_numpy((keys & np.uint64(0x7FFFFFFFFFFFFFFF)).astype(np.int64))
        offset_y = (low_bits & 0xFFFFF) % (2 * pad + 1)
        offset_x = ((low_bits >> 20) & 0xFFFFF) % (2 * pad + 1)
        flip = torch.from_numpy((keys >> np.uint64(63)).astype(bool)) & self.horizontal_flip
        column_steps = torch.arange(width).expand(batch, width)
        column_steps = torch.where(flip[:, None], column_steps.flip(1), column_steps)
        rows = (offset_y[:, None] + torch.arange(height)).view(batch, 1, height, 1)
        columns = (offset_x[:, None] + column_steps).view(batch, 1, 1, width)
        planes = torch.arange(batch * channels).view(batch, channels, 1, 1)
        # One gather through flat indices does the crop and the flip (about twice as fast as advanced indexing).
        return padded.take((planes * padded.shape[2] + rows) * padded.shape[3] + columns)


class InMemoryImageDataset(Dataset):
    """Images as one uint8 N×C×H×W tensor and int64 labels; `transform` is a `TensorImageTransform`-like
    callable `transform(images_uint8, keys) -> tensor` applied to whole batches (DataLoader fetches a batch
    through `__getitems__`). Without a transform, samples are uint8 C×H×W tensors."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 transform: TensorImageTransform | None = None, *, augment_seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N×C×H×W tensor, got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        if targets.dim() != 1 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be a vector with one label per image ({images.shape[0]}), got shape "
                             f"{tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.transform = transform
        self.augment_seed = int(augment_seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitems__` uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        _, channels, height, width = self.images.shape
        return (f"{type(self).__name__}(samples={len(self)}, image={channels}×{height}×{width}, "
                f"classes={len(self.classes)}, transform={self.transform!r})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index_tensor = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        size = len(self)
        if index_tensor.numel() and not (-size <= int(index_tensor.min()) and int(index_tensor.max()) < size):
            raise IndexError(f"index out of range for a dataset of {size} samples: {list(indices)}")
        index_tensor = torch.where(index_tensor < 0, index_tensor + size, index_tensor)
        images = self.images[index_tensor]
        if self.transform is not None:
            images = self.transform(images, sample_keys(self.augment_seed, self.epoch, index_tensor.numpy()))
        return list(zip(images.unbind(0), self.targets[index_tensor].unbind(0)))

    def select(self, indices: Sequence[int] | torch.Tensor) -> InMemoryImageDataset:
        """A copy holding only the given rows (same class, transform and seed; indices renumbered from 0)."""
        index_tensor = torch.as_tensor(indices, dtype=torch.long)
        selected = copy.copy(self)
        selected.images = self.images[index_tensor]
        selected.targets = self.targets[index_tensor]
        return selected
