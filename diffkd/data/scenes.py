"""`fashion-scenes`: real Fashion-MNIST items composed into scenes, for detection and segmentation.

Each scene is a square greyscale canvas (128×128 by default) on a non-trivial background — a linear gradient in
a random direction, smooth low-frequency blotches and pixel noise — holding 1 to 4 Fashion-MNIST items. An item
is scaled by a random factor (0.8–2.0 of its 28 pixels, bilinear with antialiasing), dimmed by a random gain
(180/255–1) and pasted where its scaled pixels reach `threshold` (32 of 255): those pixels are the item's mask.
Items are drawn one after another, each on top of the ones before it, and placed so that

- the IoU of the full (unoccluded) tight boxes of any two items is at most `max_iou` (0.3), and
- every item keeps at least `min_visible` (half) of its mask pixels visible once all items are drawn.

An item that finds no such place in `placement_attempts` tries is left out, so a scene may hold fewer items than
drawn (but at least one: the first item always fits).

Targets follow what is visible: where items overlap the top one wins, in the instance masks and in the semantic
map alike, and each box is the tight box of its item's visible pixels. Labels are 1..10 (Fashion-MNIST's class +
1) with 0 for the background, which is also the background class of the 11-class semantic map — what
torchvision's detectors (num_classes=11, background included) and segmentation models expect.

Scenes are a pure function of (items, split, seed, index): each scene draws from its own generator seeded with
(seed, split, index), so a scene does not depend on how many scenes are made, and nothing depends on DataLoader
workers (generation happens once, in memory, when the dataset is built). Training scenes use only items of
Fashion-MNIST's training split, test scenes only items of its test split.

Images come out as 3-channel float tensors (the grey level replicated, since torchvision's backbones take RGB),
in 0..1 for detection (torchvision's detectors normalise inside the model) or normalised with `SCENES_MEAN` /
`SCENES_STD` when the dataset is given them (segmentation models take normalised input).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from diffkd.data.dense import IGNORE_INDEX, flip_target, key_flips, normalizer
from diffkd.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, FashionMNIST
from diffkd.data.in_memory import sample_keys

SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
TARGET_KEYS = ("boxes", "labels", "masks", "semantic", "image_id")
# Pixel statistics of the default scenes (128×128, 2,000 training scenes of the real Fashion-MNIST), checked in
# tests/test_scenes.py; replicated over the three channels.
SCENES_MEAN, SCENES_STD = (0.2653,) * 3, (0.1417,) * 3
_ITEM_SIZE = 28
_SPLIT_CODES = {"train": 0, "test": 1}
_MIN_GAIN = 180  # of 255: the dimmest an item is drawn
_BLOTCH_GRID = 4  # low-frequency blotches: a 4×4 grid of random levels, smoothly interpolated


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are composed (see the module's docstring for what each setting means)."""

    image_size: int = 128
    min_items: int = 1
    max_items: int = 4
    scale_range: tuple[float, float] = (0.8, 2.0)
    max_iou: float = 0.3
    min_visible: float = 0.5
    threshold: int = 32
    placement_attempts: int = 50

    def __post_init__(self):
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        largest = round(_ITEM_SIZE * high)
        if self.image_size < largest:
            raise ValueError(f"image_size {self.image_size} is smaller than the largest scaled item ({largest} "
                             f"pixels at scale {high}): raise image_size or lower scale_range")
        if not 1 <= self.min_items <= self.max_items or self.max_items > 255:
            raise ValueError(f"need 1 <= min_items <= max_items <= 255, got {self.min_items} and {self.max_items}")
        if not 0 <= self.max_iou < 1 or not 0 < self.min_visible <= 1:
            raise ValueError(f"need 0 <= max_iou < 1 and 0 < min_visible <= 1, got {self.max_iou} and "
                             f"{self.min_visible}")
        if not 1 <= self.threshold <= 255 or self.placement_attempts < 1:
            raise ValueError(f"need threshold in 1..255 and placement_attempts >= 1, got {self.threshold} and "
                             f"{self.placement_attempts}")


@dataclass
class Scenes:
    """Generated scenes: uint8 greyscale `images` and `instance_maps` (N×H×W; pixel value j > 0 = the scene's
    j-th item, 0 = background), and per scene, in drawing order (last on top): `labels` (1..10), visible tight
    `boxes` and unoccluded `full_boxes` (float32 k×4, pixel-edge xyxy), the items' `source_indices` into the
    split's Fashion-MNIST images and `placements` (int64 k×4: top row, left column, scaled side, gain of 255),
    and a `scene_ids` entry (the scene's index at generation, kept by `select`)."""

    split: str
    images: np.ndarray
    instance_maps: np.ndarray
    labels: list[np.ndarray]
    boxes: list[np.ndarray]
    full_boxes: list[np.ndarray]
    source_indices: list[np.ndarray]
    placements: list[np.ndarray]
    scene_ids: np.ndarray
    config: SceneConfig = field(default_factory=SceneConfig)

    def __len__(self) -> int:
        return self.images.shape[0]


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """Pixel-edge xyxy box of a non-empty boolean H×W mask."""
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    intersection = width * height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return intersection / ((box[2] - box[0]) * (box[3] - box[1]) + areas - intersection)


def scale_items(items: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Each 28×28 uint8 item resized to sizes[i]×sizes[i] (bilinear, antialiased, rounded to uint8), one
    interpolation call per distinct size."""
    scaled: list[np.ndarray | None] = [None] * len(items)
    source = torch.from_numpy(np.ascontiguousarray(items)).unsqueeze(1).float()
    for size in np.unique(sizes):
        chosen = np.flatnonzero(sizes == size)
        resized = F.interpolate(source[torch.from_numpy(chosen)], size=(int(size), int(size)), mode="bilinear",
                                align_corners=False, antialias=True)
        for i, patch in zip(chosen, resized.round_().clamp_(0, 255).to(torch.uint8)[:, 0].numpy()):
            scaled[i] = patch
    return scaled


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 size×size background: a mean level of 25..95 (of 255), a gradient of up to ±20 across the canvas,
    smooth blotches and pixel noise."""
    level, slope, angle = rng.uniform(25, 95), rng.uniform(-40, 40), rng.uniform(0, 2 * np.pi)
    coordinates = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    gradient = slope * (np.cos(angle) * coordinates[None, :] + np.sin(angle) * coordinates[:, None])
    # Bilinear upsampling of a small grid as two matrix products (rows, then columns).
    grid_positions = coordinates * (_BLOTCH_GRID - 1) + (_BLOTCH_GRID - 1) / 2
    weights = np.clip(1 - np.abs(grid_positions[:, None] - np.arange(_BLOTCH_GRID)[None, :]), 0, None)
    blotches = weights @ rng.normal(0, 12, (_BLOTCH_GRID, _BLOTCH_GRID)).astype(np.float32) @ weights.T
    noise = rng.normal(0, 5, (size, size)).astype(np.float32)
    return level + gradient + blotches + noise


def generate_scenes(item_images: np.ndarray, item_labels: np.ndarray, num_scenes: int, *, split: str,
                    seed: int = 0, config: SceneConfig | None = None) -> Scenes:
    """`num_scenes` scenes composed of the given Fashion-MNIST items (uint8 N×28×28, labels 0..9) of `split`
    ("train" or "test"). The same arguments give byte-identical scenes."""
    config = config or SceneConfig()
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if item_images.dtype != np.uint8 or item_images.ndim != 3 or item_images.shape[1:] != (_ITEM_SIZE,) * 2:
        raise ValueError(f"items must be uint8 N×28×28 Fashion-MNIST images, got {item_images.dtype} "
                         f"{item_images.shape}")
    if item_labels.shape != item_images.shape[:1]:
        raise ValueError(f"need one label per item ({item_images.shape[0]}), got shape {item_labels.shape}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    # Items with almost nothing above the threshold would give empty masks once scaled down.
    pool = np.flatnonzero((item_images >= config.threshold).sum((1, 2)) >= 20)
    if pool.size == 0:
        raise ValueError(f"no item has 20 or more pixels >= the threshold {config.threshold}: these are not "
                         f"Fashion-MNIST images")
    size = config.image_size
    generators = [np.random.default_rng([seed, _SPLIT_CODES[split], index]) for index in range(num_scenes)]

    # What each scene holds, drawn first so that all items can be scaled together.
    counts = [int(rng.integers(config.min_items, config.max_items + 1)) for rng in generators]
    sources = [pool[rng.integers(0, pool.size, count)] for rng, count in zip(generators, counts)]
    scales = [rng.uniform(*config.scale_range, count) for rng, count in zip(generators, counts)]
    gains = [rng.integers(_MIN_GAIN, 256, count) for rng, count in zip(generators, counts)]
    flat_sources = np.concatenate(sources)
    patches = scale_items(item_images[flat_sources], np.rint(np.concatenate(scales) * _ITEM_SIZE).astype(np.int64))

    images = np.empty((num_scenes, size, size), dtype=np.uint8)
    instance_maps = np.zeros((num_scenes, size, size), dtype=np.uint8)
    labels, boxes, full_boxes, kept_sources, placements = [], [], [], [], []
    first_patch = 0
    for index, rng in enumerate(generators):
        images[index] = np.clip(np.rint(_background(rng, size)), 0, 255).astype(np.uint8)
        scene_patches = patches[first_patch:first_patch + counts[index]]
        first_patch += counts[index]
        placed, placed_at, placed_boxes = _place_items(rng, scene_patches, gains[index], images[index],
                                                       instance_maps[index], config)
        labels.append(item_labels[sources[index][placed]].astype(np.int64) + 1)
        boxes.append(np.array([_tight_box(instance_maps[index] == j + 1) for j in range(len(placed))],
                              dtype=np.float32).reshape(-1, 4))
        full_boxes.append(placed_boxes)
        kept_sources.append(sources[index][placed])
        placements.append(placed_at)
    return Scenes(split, images, instance_maps, labels, boxes, full_boxes, kept_sources, placements,
                  np.arange(num_scenes, dtype=np.int64), config)


def _place_items(rng: np.random.Generator, patches: Sequence[np.ndarray], gains: np.ndarray, canvas: np.ndarray,
                 instances: np.ndarray, config: SceneConfig) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Draws the scaled items one on top of the other into `canvas` and `instances` (in place) where the overlap
    rules allow; returns the positions of the items placed, their placements (top, left, side, gain) and their
    full boxes."""
    placed: list[int] = []
    placements = np.empty((0, 4), dtype=np.int64)
    placed_boxes = np.empty((0, 4), dtype=np.float32)
    areas = visible = np.empty(0, dtype=np.int64)
    for item, patch in enumerate(patches):
        mask = patch >= config.threshold
        if not mask.any():
            continue
        box_in_patch, side, area = _tight_box(mask), patch.shape[0], int(mask.sum())
        for _ in range(config.placement_attempts):
            top, left = (int(v) for v in rng.integers(0, config.image_size - side + 1, 2))
            box = box_in_patch + np.array([left, top, left, top], dtype=np.float32)
            if placed and _iou(box, placed_boxes).max() > config.max_iou:
                continue
            window = instances[top:top + side, left:left + side]
            covered = np.bincount(window[mask], minlength=len(placed) + 1)[1:]
            if np.any(visible - covered < config.min_visible * areas):
                continue
            window[mask] = len(placed) + 1
            canvas[top:top + side, left:left + side][mask] = patch[mask].astype(np.uint16) * gains[item] // 255
            visible, areas = np.append(visible - covered, area), np.append(areas, area)
            placed.append(item)
            placements = np.concatenate([placements, [[top, left, side, gains[item]]]])
            placed_boxes = np.concatenate([placed_boxes, box[None]])
            break
    return placed, placements, placed_boxes


class FashionScenes(Dataset):
    """Scenes as a dataset of `(image, target)`: a float32 3×H×W image and a dict with the entries of
    `target_keys` (default all): `boxes` (float32 k×4 xyxy), `labels` (int64 k, 1..10), `masks` (uint8 k×H×W),
    `semantic` (int64 H×W, 0..10) and `image_id` (int, the scene's id; also its id in `coco_ground_truth()`).

    With `horizontal_flip`, sample i of epoch e is mirrored (image and every target alike) when the key of
    (augment_seed, e, i) says so (diffkd.data.in_memory); `set_epoch` selects the epoch, and the training
    sampler of diffkd.data.loaders calls it.
    """

    classes = SCENE_CLASSES
    category_ids = tuple(range(1, len(SCENE_CLASSES)))  # the COCO category id of each label 1..10

    def __init__(self, scenes: Scenes, *, horizontal_flip: bool = False, augment_seed: int = 0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 target_keys: Sequence[str] = TARGET_KEYS):
        unknown = sorted(set(target_keys) - set(TARGET_KEYS))
        if unknown:
            raise ValueError(f"unknown target keys {unknown}; choose among {', '.join(TARGET_KEYS)}")
        self.scenes = scenes
        self.horizontal_flip = bool(horizontal_flip)
        self.augment_seed = int(augment_seed)
        self.normalize = normalizer(mean, std)
        self.target_keys = tuple(target_keys)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scenes)

    def __repr__(self) -> str:
        size = self.scenes.config.image_size
        return (f"{type(self).__name__}(split={self.scenes.split}, scenes={len(self)}, image=3×{size}×{size}, "
                f"items={sum(len(labels) for labels in self.scenes.labels)}, horizontal_flip={self.horizontal_flip})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for {size} scenes")
        index %= size
        image = torch.from_numpy(self.scenes.images[index]).float().div_(255).expand(3, -1, -1)
        instances = torch.from_numpy(self.scenes.instance_maps[index]).long()
        labels = torch.from_numpy(self.scenes.labels[index])
        target: dict[str, Any] = {}
        for key in self.target_keys:
            if key == "boxes":
                target[key] = torch.from_numpy(self.scenes.boxes[index]).reshape(-1, 4)
            elif key == "labels":
                target[key] = labels
            elif key == "masks":
                target[key] = (instances[None] == torch.arange(1, len(labels) + 1)[:, None, None]).to(torch.uint8)
            elif key == "semantic":
                target[key] = torch.cat([labels.new_zeros(1), labels])[instances]
            else:
                target[key] = int(self.scenes.scene_ids[index])
        if self.horizontal_flip and key_flips(sample_keys(self.augment_seed, self.epoch, [index]))[0]:
            image = image.flip(-1)
            target = flip_target(target, image.shape[-1])
        if self.normalize is not None:
            image = self.normalize(image)
        return image.contiguous(), target

    def select(self, indices: Sequence[int] | torch.Tensor) -> FashionScenes:
        """A copy holding only the given scenes (indices renumbered from 0; image ids kept)."""
        chosen = [int(i) for i in indices]
        scenes = self.scenes
        selected = copy.copy(self)
        selected.scenes = Scenes(scenes.split, scenes.images[chosen], scenes.instance_maps[chosen],
                                 *([column[i] for i in chosen] for column in (
                                     scenes.labels, scenes.boxes, scenes.full_boxes, scenes.source_indices,
                                     scenes.placements)),
                                 scenes.scene_ids[chosen], scenes.config)
        return selected

    def coco_ground_truth(self) -> dict[str, list]:
        """The scenes' visible boxes as a COCO instances dict (image ids = scene ids, category ids = labels,
        area = visible pixels), for diffkd.metrics.DetectionEvaluator."""
        size = self.scenes.config.image_size
        scenes = self.scenes
        images, annotations = [], []
        for index, scene_id in enumerate(scenes.scene_ids.tolist()):
            images.append({"id": scene_id, "width": size, "height": size})
            areas = np.bincount(scenes.instance_maps[index].ravel(), minlength=len(scenes.labels[index]) + 1)
            for j, (box, label) in enumerate(zip(scenes.boxes[index].tolist(), scenes.labels[index].tolist())):
                annotations.append({"id": len(annotations) + 1, "image_id": scene_id, "category_id": label,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "area": int(areas[j + 1]), "iscrowd": 0})
        categories = [{"id": category, "name": name}
                      for category, name in zip(self.category_ids, FASHION_MNIST_CLASSES)]
        return {"images": images, "annotations": annotations, "categories": categories}


def build_scene_datasets(data_dir: str | Path | None = None, *, train_scenes: int = 2000, test_scenes: int = 500,
                         seed: int = 0, config: SceneConfig | None = None, task: str = "detection",
                         train_transform: bool = True, augment_seed: int = 0
                         ) -> tuple[FashionScenes, FashionScenes, dict[str, Any]]:
    """Training scenes from Fashion-MNIST's training items and test scenes from its test items (IDX files in
    `data_dir`, default Debian's dataset-fashion-mnist folder), with a dict of facts: num_classes (11, background
    included), classes, category_ids, in_chans, image_size, mean, std, ignore_index.

    `task="detection"`: images in 0..1 (pass info's mean and std to the detector, which normalises inside) and
    targets boxes, labels and image_id. `task="segmentation"`: normalised images and targets semantic and
    image_id. Training scenes are flipped at random unless `train_transform=False`.
    """
    if task not in ("detection", "segmentation"):
        raise ValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
    config = config or SceneConfig()
    root = data_dir or DEFAULT_FASHION_MNIST_DIR
    if task == "detection":
        # Without masks: torchvision's detection transform would resize them at every step for nothing.
        options = dict(target_keys=("boxes", "labels", "image_id"))
    else:
        options = dict(target_keys=("semantic", "image_id"), mean=SCENES_MEAN, std=SCENES_STD)
    datasets = []
    for train, count in ((True, train_scenes), (False, test_scenes)):
        items = FashionMNIST(root, train=train)
        scenes = generate_scenes(items.data.numpy(), items.targets.numpy(), count,
                                 split="train" if train else "test", seed=seed, config=config)
        datasets.append(FashionScenes(scenes, horizontal_flip=train and train_transform,
                                      augment_seed=augment_seed, **options))
    info = dict(num_classes=len(SCENE_CLASSES), classes=SCENE_CLASSES, category_ids=FashionScenes.category_ids,
                in_chans=3, image_size=config.image_size, mean=SCENES_MEAN, std=SCENES_STD, ignore_index=IGNORE_INDEX)
    return datasets[0], datasets[1], info
