"""A user's own detection data in COCO's format: an images folder and an instances JSON per split.

Layout (`<dir>` is --data-dir)::

    <dir>/annotations/instances_train.json   <dir>/train/<file_name of each image>
    <dir>/annotations/instances_val.json     <dir>/val/<file_name of each image>

COCO's own names are accepted as well: `instances_<split><suffix>.json` with images in `<split><suffix>/`, e.g.
`annotations/instances_train2017.json` with `train2017/` (a suffix must then be unique per split).

The annotations are checked when the dataset is built, and anything wrong is refused with a ValueError naming the
annotation or image: a box reaching more than 1 pixel outside its image (boxes within that tolerance are clipped
to the image), a box of zero or negative width or height, an unknown category id, an annotation of an image the
JSON does not list, a missing image file, an image file that cannot be read or was cut short (JPEG and PNG
end markers), or whose size differs from the JSON's width and height (every file's header is read: quick, and
before any training step). Images without annotations are kept, as negatives (torchvision's
detectors train on them, and COCO's evaluation counts their false positives). Crowd annotations (`iscrowd: 1`)
are left out of the training targets, as torchvision's detection references do, and kept in the ground truth of
the evaluation, where COCO's evaluation treats them as regions to ignore.

Category ids are mapped to contiguous labels 1..K in increasing id order (0 is the background); the dataset's
`category_ids[label - 1]` gives a label's id back, which diffkd.metrics.DetectionEvaluator uses to score in COCO's
own ids.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from diffkd.data.dense import flip_target, image_file_sizes, key_flips
from diffkd.data.in_memory import sample_keys

BOX_TOLERANCE = 1.0  # pixels a box may reach outside its image before it is refused
_LAYOUT = ("expected <data-dir>/annotations/instances_<split>.json with the images in <data-dir>/<split>/ for the "
           "splits train and val (COCO's names such as annotations/instances_train2017.json with train2017/ work "
           "too)")


def find_coco_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """The (instances JSON, images folder) of `split` ("train" or "val") under `root`; FileNotFoundError naming
    what is missing otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO data: folder {root} does not exist; {_LAYOUT}")
    annotations = root / "annotations"
    pattern = re.compile(rf"instances_{split}(\w*)\.json")
    candidates = sorted(path for path in annotations.glob(f"instances_{split}*.json") if pattern.fullmatch(path.name))
    if not candidates:
        raise FileNotFoundError(f"COCO data: no {annotations}/instances_{split}.json (nor "
                                f"instances_{split}<suffix>.json); {_LAYOUT}")
    if len(candidates) > 1:
        raise ValueError(f"COCO data: several annotation files for the {split} split in {annotations}: "
                         f"{', '.join(path.name for path in candidates)}; keep one")
    json_path = candidates[0]
    images_dir = root / f"{split}{pattern.fullmatch(json_path.name).group(1)}"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO data: {json_path.name} is there but its images folder {images_dir} is "
                                f"missing; {_LAYOUT}")
    return json_path, images_dir


def _require(content: dict, key: str, path: Path) -> list:
    value = content.get(key) if isinstance(content, dict) else None
    if not isinstance(value, list):
        raise ValueError(f"{path}: not a COCO instances file: expected a list under {key!r} (with 'images', "
                         f"'annotations' and 'categories')")
    return value


def load_coco_instances(json_path: str | Path, images_dir: str | Path) -> dict[str, Any]:
    """A COCO instances JSON read and checked against its images folder (see the module's docstring for the
    checks). Returns the dict with boxes clipped to their images and `area` filled in where absent."""
    json_path, images_dir = Path(json_path), Path(images_dir)
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path}: not valid JSON ({error})") from error
    images, annotations, categories = (_require(content, key, json_path)
                                       for key in ("images", "annotations", "categories"))
    category_ids = set()
    for category in categories:
        if not isinstance(category.get("id"), int) or category["id"] in category_ids:
            raise ValueError(f"{json_path}: each category needs a unique integer 'id', found {category}")
        category_ids.add(category["id"])
    sizes = {}
    for image in images:
        if not (isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str)
                and isinstance(image.get("width"), int) and isinstance(image.get("height"), int)):
            raise ValueError(f"{json_path}: each image needs an integer 'id', 'width' and 'height' and a "
                             f"'file_name', found {image}")
        if image["id"] in sizes:
            raise ValueError(f"{json_path}: image id {image['id']} is listed twice")
        if not (images_dir / image["file_name"]).is_file():
            raise ValueError(f"{json_path}: the file {images_dir / image['file_name']} of image id {image['id']} "
                             f"is missing; copy it there or remove the image and its annotations from the JSON")
        sizes[image["id"]] = (image["width"], image["height"])
    files = [images_dir / image["file_name"] for image in images]
    for image, path, size in zip(images, files, image_file_sizes(files)):
        if size != sizes[image["id"]]:
            raise ValueError(f"{json_path}: image id {image['id']}: {path} is {size[0]}×{size[1]} pixels but the JSON "
                             f"says {image['width']}×{image['height']}; fix the image's width and height in the JSON")
    checked, annotation_ids = [], set()
    for annotation in annotations:
        where = f"{json_path}: annotation {annotation.get('id')} (image id {annotation.get('image_id')})"
        if not isinstance(annotation.get("id"), int) or annotation["id"] in annotation_ids:
            raise ValueError(f"{where}: each annotation needs a unique integer 'id'")
        annotation_ids.add(annotation["id"])
        if annotation.get("category_id") not in category_ids:
            raise ValueError(f"{where}: unknown category id {annotation.get('category_id')!r}; the categories are "
                             f"{sorted(category_ids)}")
        if annotation.get("image_id") not in sizes:
            raise ValueError(f"{where}: its image id is not among the JSON's images")
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{where}: 'bbox' must be [x, y, width, height], found {bbox!r}")
        x, y, width, height = (float(v) for v in bbox)
        if width <= 0 or height <= 0:
            raise ValueError(f"{where}: box {bbox} has a non-positive width or height; fix or remove it")
        image_width, image_height = sizes[annotation["image_id"]]
        if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + width > image_width + BOX_TOLERANCE
                or y + height > image_height + BOX_TOLERANCE):
            raise ValueError(f"{where}: box {bbox} (x, y, width, height) reaches outside its "
                             f"{image_width}×{image_height} image by more than {BOX_TOLERANCE:g} pixel; fix or "
                             f"remove it")
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + width, image_width), min(y + height, image_height)
        checked.append({**annotation, "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float(annotation.get("area", (x2 - x1) * (y2 - y1))),
                        "iscrowd": int(annotation.get("iscrowd", 0))})
    return {**content, "annotations": checked}


class CocoDetection(Dataset):
    """One split of a COCO-format detection set (see the module's docstring for the layout and the checks).

    Samples are `(image, target)`: a float32 3×H×W image in 0..1 (torchvision's detectors normalise inside) and
    `{"boxes": float32 k×4 xyxy, "labels": int64 k in 1..K, "image_id": the COCO image id}` without crowd
    annotations. With `horizontal_flip`, sample i of epoch e is mirrored when the key of (augment_seed, e, i)
    says so (diffkd.data.in_memory); `set_epoch` selects the epoch.
    """

    def __init__(self, root: str | Path, train: bool = True, *, horizontal_flip: bool = False, augment_seed: int = 0):
        self.json_path, self.images_dir = find_coco_split(root, "train" if train else "val")
        self.coco = load_coco_instances(self.json_path, self.images_dir)
        categories = sorted(self.coco["categories"], key=lambda category: category["id"])
        self.category_ids = tuple(category["id"] for category in categories)
        self.classes = ("background", *(str(category.get("name", category["id"])) for category in categories))
        label_of = {category_id: label for label, category_id in enumerate(self.category_ids, start=1)}
        by_image: dict[int, list[dict]] = {image["id"]: [] for image in self.coco["images"]}
        for annotation in self.coco["annotations"]:
            if not annotation["iscrowd"]:
                by_image[annotation["image_id"]].append(annotation)
        self.images = [dict(image) for image in self.coco["images"]]
        self.targets = []
        for image in self.images:
            found = by_image[image["id"]]
            boxes = np.array([a["bbox"] for a in found], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            labels = np.array([label_of[a["category_id"]] for a in found], dtype=np.int64)
            self.targets.append((boxes, labels))
        self.train = train
        self.horizontal_flip = bool(horizontal_flip)
        self.augment_seed = int(augment_seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.json_path.name}, images={len(self)}, classes={len(self.classes) - 1}, "
                f"horizontal_flip={self.horizontal_flip})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        path = self.images_dir / info["file_name"]
        with Image.open(path) as opened:
            image = pil_to_tensor(opened.convert("RGB")).float().div_(255)
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise ValueError(f"{path} is {image.shape[2]}×{image.shape[1]} pixels but {self.json_path} says "
                             f"{info['width']}×{info['height']}: fix the image's width and height in the JSON")
        boxes, labels = self.targets[index]
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "image_id": info["id"]}
        if self.horizontal_flip and key_flips(sample_keys(self.augment_seed, self.epoch, [index]))[0]:
            image = image.flip(-1)
            target = flip_target(target, image.shape[-1])
        return image, target

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, from the JSON (checked against the files): evaluation batches group
        images of one size (diffkd.data.loaders)."""
        return [(info["height"], info["width"]) for info in self.images]

    def select(self, indices: Sequence[int] | torch.Tensor) -> CocoDetection:
        """A copy holding only the given images (indices renumbered from 0; image ids kept)."""
        chosen = [int(i) for i in indices]
        selected = copy.copy(self)
        selected.images = [self.images[i] for i in chosen]
        selected.targets = [self.targets[i] for i in chosen]
        return selected

    def coco_ground_truth(self) -> dict[str, Any]:
        """The split's checked COCO dict restricted to this dataset's images (crowd annotations included), for
        diffkd.metrics.DetectionEvaluator."""
        kept = {image["id"] for image in self.images}
        return {**self.coco, "images": [image for image in self.coco["images"] if image["id"] in kept],
                "annotations": [a for a in self.coco["annotations"] if a["image_id"] in kept]}


def build_coco_datasets(data_dir: str | Path, *, train_transform: bool = True, augment_seed: int = 0
                        ) -> tuple[CocoDetection, CocoDetection, dict[str, Any]]:
    """The train and val splits of a COCO-format set and a dict of facts: num_classes (K + 1, background
    included), classes, category_ids, in_chans. Training images are flipped at random unless
    `train_transform=False`."""
    train_ds = CocoDetection(data_dir, train=True, horizontal_flip=train_transform, augment_seed=augment_seed)
    val_ds = CocoDetection(data_dir, train=False)
    if train_ds.category_ids != val_ds.category_ids:
        raise ValueError(f"COCO data: the train and val JSON files list different category ids "
                         f"({list(train_ds.category_ids)} and {list(val_ds.category_ids)}); labels would not line "
                         f"up. Give both the same 'categories'.")
    info = dict(num_classes=len(train_ds.classes), classes=train_ds.classes, category_ids=train_ds.category_ids,
                in_chans=3)
    return train_ds, val_ds, info
