"""Pieces shared by the detection and segmentation datasets: collate functions, the horizontal flip of images
with their targets, per-sample random numbers drawn from the counter-based keys of diffkd.data.in_memory, and
the check of every image file's header when a dataset is built.

Conventions of every dense dataset here:
- images are float32 C×H×W tensors (in 0..1, or normalised when the dataset is given a mean and std);
- boxes are float32 N×4 `(x1, y1, x2, y2)` in pixel-edge coordinates: a box covers the pixel columns
  x1 <= c < x2 and rows y1 <= r < y2, as torchvision's detectors and COCO's `[x, y, width, height]` read them;
- detection labels are int64 in 1..K with 0 kept for the background, as torchvision's detectors expect;
- semantic maps are int64 H×W class ids with `IGNORE_INDEX` (255) for pixels that do not count.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

IGNORE_INDEX = 255
_FIELD_BITS = 20  # a key's low 60 bits hold three 20-bit fields; its top bit is the flip (as in in_memory.py)


def key_flips(keys: np.ndarray) -> np.ndarray:
    """Whether each sample is flipped: the top bit of its key (probability 1/2)."""
    return (np.asarray(keys, dtype=np.uint64) >> np.uint64(63)).astype(bool)


def key_uniforms(key: np.uint64, count: int) -> list[float]:
    """Up to three numbers in [0, 1) from disjoint 20-bit fields of one sample key (independent of its flip bit)."""
    if not 1 <= count <= 3:
        raise ValueError(f"a key holds at most three 20-bit fields, asked for {count}")
    low_bits = int(np.uint64(key) & np.uint64(0x7FFFFFFFFFFFFFFF))
    mask = (1 << _FIELD_BITS) - 1
    return [((low_bits >> (_FIELD_BITS * i)) & mask) / (1 << _FIELD_BITS) for i in range(count)]


# A complete file of these formats has its end marker in its last bytes (JPEG's end-of-image, PNG's IEND chunk).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096
_PARALLEL_FROM = 64  # files; fewer are checked in the calling thread


def image_file_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header; ValueError naming the file when it cannot be read
    or (JPEG, PNG) lacks its end marker, i.e. was cut short. Only the header and the last few KiB are read."""
    try:
        with Image.open(path) as image:
            size, kind = image.size, image.format
    except (OSError, SyntaxError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error}); replace or remove it") from None
    marker = _END_MARKERS.get(kind)
    if marker is not None:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
            complete = marker in file.read()
        if not complete:
            raise ValueError(f"{path}: the {kind} file is truncated (its end marker is missing); replace or remove it")
    return size


def image_file_sizes(paths: Sequence[str | Path]) -> list[tuple[int, int]]:
    """`image_file_size` of every path, in order (threads for many files: the work is mostly waiting on reads)."""
    if len(paths) < _PARALLEL_FROM:
        return [image_file_size(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(image_file_size, paths))


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes of an image of `width` columns mirrored left-right (pixel-edge coordinates: x -> width - x)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def flip_target(target: Mapping[str, Any], width: int) -> dict[str, Any]:
    """A target dict mirrored left-right: boxes, masks (N×H×W) and semantic (H×W); other entries are kept."""
    flipped = dict(target)
    if "boxes" in flipped:
        flipped["boxes"] = flip_boxes(flipped["boxes"], width)
    for key in ("masks", "semantic"):
        if key in flipped:
            flipped[key] = flipped[key].flip(-1)
    return flipped


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch as torchvision's detectors take it: a list of images (sizes may differ) and a list of targets."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def segmentation_collate(batch: Sequence[tuple[torch.Tensor, Mapping[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images stacked B×C×H×W and semantic maps stacked B×H×W (int64).

    Samples of different sizes are padded at the bottom and right to the largest height and width of the batch:
    images with 0, semantic maps with IGNORE_INDEX, so padded pixels count in no metric and no loss.
    """
    images = [image for image, _ in batch]
    semantics = [target["semantic"] for _, target in batch]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)

    def padded(tensor: torch.Tensor, value: float) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

    return (torch.stack([padded(image, 0.0) for image in images]),
            torch.stack([padded(semantic, IGNORE_INDEX) for semantic in semantics]))


def normalizer(mean: Sequence[float] | None, std: Sequence[float] | None) -> transforms.Normalize | None:
    """torchvision's per-channel `(x - mean) / std` on float C×H×W tensors, or None without statistics."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (one value per channel), or neither")
    if mean is None:
        return None
    if len(mean) != len(std) or any(value <= 0 for value in std):
        raise ValueError(f"mean and std need one value per channel and std values > 0, got {tuple(mean)} and "
                         f"{tuple(std)}")
    return transforms.Normalize(mean, std)
