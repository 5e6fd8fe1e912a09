"""A user's own semantic-segmentation data: images and class-id masks in two parallel folders.

Layout (`<dir>` is --data-dir)::

    <dir>/images/train/<stem>.png|.jpg|.jpeg     <dir>/masks/train/<stem>.png
    <dir>/images/val/<stem>.png|.jpg|.jpeg       <dir>/masks/val/<stem>.png
    <dir>/classes.txt                            optional: one class name per line, class id = line number - 1

A mask is a single-channel PNG (mode L, P as in Pascal VOC, I or 1) of its image's size whose pixel values are
class ids 0..num_classes-1, or 255 for pixels to ignore. The number of classes comes from `num_classes` or, when
that is not given, from classes.txt. Building the dataset refuses, with a ValueError naming the files: an image
without its mask, a mask without its image, two images with the same stem, an image or mask that cannot be read or
was cut short (every file's header and end marker are read: quick, and before any training step), a mask whose
size differs from its image's, a mask that is not single-channel, and (reading every mask once, unless `scan_masks=False`) a class id
>= num_classes other than 255. A mask is checked again whenever it is loaded.

Training samples can be scaled by a random factor, cropped to `crop_size` (padded where smaller: image with the
mean colour, mask with 255) and flipped; the draws of sample i in epoch e are a pure function of
(augment_seed, e, i) (diffkd.data.in_memory). Validation samples keep their own size;
diffkd.data.dense.segmentation_collate pads a batch to its largest image, with 255 in the masks.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from diffkd.data.dense import IGNORE_INDEX, image_file_sizes, key_flips, key_uniforms, normalizer
from diffkd.data.in_memory import sample_keys
from diffkd.data.recipes import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MASK_MODES = ("L", "P", "I", "I;16", "1")
_LAYOUT = ("expected <data-dir>/images/<split>/<stem>.png|.jpg|.jpeg and <data-dir>/masks/<split>/<stem>.png for "
           "the splits train and val")


def _listing(paths: Sequence[Path], limit: int = 5) -> str:
    names = [path.name for path in sorted(paths)]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_class_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """A mask PNG as an H×W uint8/int64 array of class ids, refusing multi-channel masks and ids >= num_classes
    other than IGNORE_INDEX with a ValueError naming the file."""
    with Image.open(path) as mask:
        if mask.mode not in _MASK_MODES:
            raise ValueError(f"{path}: a mask must hold class ids in one channel (mode {', '.join(_MASK_MODES)}), "
                             f"found mode {mask.mode}; convert colour-coded masks to class ids first")
        values = np.asarray(mask)
    values = values.astype(np.uint8) if values.dtype == bool else values
    bad = (values >= num_classes) & (values != IGNORE_INDEX)
    if bad.any():
        found = sorted(set(np.unique(values[bad]).tolist()))[:5]
        raise ValueError(f"{path}: class ids {found} are >= num_classes ({num_classes}); masks may hold "
                         f"0..{num_classes - 1} and {IGNORE_INDEX} (ignore). Raise num_classes or fix the mask")
    return values


def _stems(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"segmentation folder: {folder} is missing; {_LAYOUT}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in found:
                raise ValueError(f"segmentation folder: {found[path.stem].name} and {path.name} in {folder} share "
                                 f"the stem {path.stem!r}; each image needs its own stem to find its mask")
            found[path.stem] = path
    return found


def _class_names(root: Path, num_classes: int | None) -> tuple[str, ...]:
    names_path = root / "classes.txt"
    names = None
    if names_path.is_file():
        names = tuple(line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip())
    if num_classes is None:
        if names is None:
            raise ValueError(f"segmentation folder: give the number of classes (num_classes, --num-classes) or "
                             f"write {names_path} with one class name per line")
        return names
    if names is not None and len(names) != num_classes:
        raise ValueError(f"segmentation folder: {names_path} names {len(names)} classes but num_classes is "
                         f"{num_classes}; make them agree")
    return names or tuple(f"class {i}" for i in range(num_classes))


class SegmentationFolder(Dataset):
    """One split of an images/masks folder pair (see the module's docstring).

    Samples are `(image, target)`: a float32 3×H×W image normalised with (mean, std) (ImageNet's by default) and
    `{"semantic": int64 H×W class ids (255 = ignore), "image_id": the sample's index at construction}`.
    """

    def __init__(self, root: str | Path, train: bool = True, *, num_classes: int | None = None,
                 crop_size: int | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                 horizontal_flip: bool = False, augment_seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scan_masks: bool = True):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"segmentation folder: {root} does not exist; {_LAYOUT}")
        self.classes = _class_names(root, num_classes)
        if not 1 <= len(self.classes) <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX} ({IGNORE_INDEX} marks ignored pixels), got "
                             f"{len(self.classes)}")
        split = "train" if train else "val"
        images = _stems(root / "images" / split, IMAGE_SUFFIXES)
        masks = _stems(root / "masks" / split, (".png",))
        without_mask = [images[stem] for stem in images.keys() - masks.keys()]
        without_image = [masks[stem] for stem in masks.keys() - images.keys()]
        if without_mask or without_image:
            problems = []
            if without_mask:
                problems.append(f"{len(without_mask)} image(s) in {root / 'images' / split} without a mask "
                                f"({_listing(without_mask)})")
            if without_image:
                problems.append(f"{len(without_image)} mask(s) in {root / 'masks' / split} without an image "
                                f"({_listing(without_image)})")
            raise ValueError(f"segmentation folder: {' and '.join(problems)}; every image needs the mask of the "
                             f"same stem, as a .png")
        if not images:
            raise ValueError(f"segmentation folder: {root / 'images' / split} holds no image; {_LAYOUT}")
        self.samples = [(images[stem], masks[stem]) for stem in sorted(images)]
        image_sizes = image_file_sizes([image_path for image_path, _ in self.samples])
        mask_sizes = image_file_sizes([mask_path for _, mask_path in self.samples])
        for (image_path, mask_path), image_size, mask_size in zip(self.samples, image_sizes, mask_sizes):
            if image_size != mask_size:
                raise ValueError(f"segmentation folder: {mask_path} is {mask_size[0]}×{mask_size[1]} but its image "
                                 f"{image_path} is {image_size[0]}×{image_size[1]}; a mask must have its image's size")
        self.sizes = [(height, width) for width, height in image_sizes]
        if scan_masks:
            for _, mask_path in self.samples:
                read_class_mask(mask_path, len(self.classes))
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be >= 1 or None, got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.image_ids = list(range(len(self.samples)))
        self.train = train
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.horizontal_flip = bool(horizontal_flip)
        self.augment_seed = int(augment_seed)
        self.normalize = normalizer(mean, std)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={len(self)}, classes={len(self.classes)}, crop_size={self.crop_size}, "
                f"horizontal_flip={self.horizontal_flip})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_path, mask_path = self.samples[index]
        with Image.open(image_path) as opened:
            image = self.normalize(pil_to_tensor(opened.convert("RGB")).float().div_(255))
        semantic = torch.from_numpy(read_class_mask(mask_path, len(self.classes)).astype(np.int64))
        key = sample_keys(self.augment_seed, self.epoch, [index])[0]
        if self.crop_size is not None:
            image, semantic = self._scale_and_crop(image, semantic, key)
        if self.horizontal_flip and key_flips(np.array([key]))[0]:
            image, semantic = image.flip(-1), semantic.flip(-1)
        return image.contiguous(), {"semantic": semantic.contiguous(), "image_id": self.image_ids[index]}

    def _scale_and_crop(self, image: torch.Tensor, semantic: torch.Tensor, key: np.uint64
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        scale_draw, row_draw, column_draw = key_uniforms(key, 3)
        low, high = self.scale_range
        scale = low + (high - low) * scale_draw
        size = [max(1, round(side * scale)) for side in image.shape[1:]]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
        semantic = F.interpolate(semantic[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        crop = self.crop_size
        pad_rows, pad_columns = max(crop - size[0], 0), max(crop - size[1], 0)
        image = F.pad(image, (0, pad_columns, 0, pad_rows), value=0.0)  # 0 after normalising: the mean colour
        semantic = F.pad(semantic, (0, pad_columns, 0, pad_rows), value=IGNORE_INDEX)
        top = int(row_draw * (image.shape[1] - crop + 1))
        left = int(column_draw * (image.shape[2] - crop + 1))
        return image[:, top:top + crop, left:left + crop], semantic[top:top + crop, left:left + crop]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every sample as `__getitem__` returns it (the crop size when cropping): evaluation
        batches group samples of one size (diffkd.data.loaders)."""
        return [(self.crop_size, self.crop_size)] * len(self) if self.crop_size is not None else list(self.sizes)

    def select(self, indices: Sequence[int] | torch.Tensor) -> SegmentationFolder:
        """A copy holding only the given samples (indices renumbered from 0; image ids kept)."""
        chosen = [int(i) for i in indices]
        selected = copy.copy(self)
        selected.samples = [self.samples[i] for i in chosen]
        selected.sizes = [self.sizes[i] for i in chosen]
        selected.image_ids = [self.image_ids[i] for i in chosen]
        return selected


def build_segfolder_datasets(data_dir: str | Path, *, num_classes: int | None = None, crop_size: int | None = None,
                             train_transform: bool = True, augment_seed: int = 0, scan_masks: bool = True
                             ) -> tuple[SegmentationFolder, SegmentationFolder, dict[str, Any]]:
    """The train and val splits of an images/masks folder pair and a dict of facts: num_classes, classes,
    in_chans, mean, std, ignore_index. Training samples are scaled 0.5–2×, cropped to `crop_size` (when given)
    and flipped at random, unless `train_transform=False`."""
    train_ds = SegmentationFolder(data_dir, train=True, num_classes=num_classes,
                                  crop_size=crop_size if train_transform else None, horizontal_flip=train_transform,
                                  augment_seed=augment_seed, scan_masks=scan_masks)
    val_ds = SegmentationFolder(data_dir, train=False, num_classes=num_classes, scan_masks=scan_masks)
    info = dict(num_classes=len(train_ds.classes), classes=train_ds.classes, in_chans=3, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, ignore_index=IGNORE_INDEX)
    return train_ds, val_ds, info
