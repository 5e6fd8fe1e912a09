"""Metrics of dense prediction: COCO box mAP for detection, mIoU and pixel accuracy for segmentation.

Both keep a state that is easy to combine across ranks: `DetectionEvaluator.state()` (the images seen and their
detections, to gather) and `SegmentationMetric.confusion` (a tensor, to all-reduce with a sum).
"""
from __future__ import annotations

import contextlib
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

COCO_BACKENDS = ("pycocotools", "faster-coco-eval")
MAX_DETECTIONS = 100  # per image, as in COCO's evaluation


def _coco_api(backend: str) -> tuple[type, type]:
    """COCO's (annotation index, evaluation) classes from `backend`, which computes the same numbers either way."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(COCO_BACKENDS)}")


def _image_ids_of(targets_or_ids: Sequence[Any]) -> list[int]:
    return [int(item["image_id"]) if isinstance(item, Mapping) else int(item) for item in targets_or_ids]


class DetectionEvaluator:
    """COCO's box mAP@[.5:.95] and mAP@.5 (in percent) of predictions on a dataset's images.

    `ground_truth` is a COCO instances dict (the datasets' `coco_ground_truth()`); `category_ids[label - 1]` is
    the COCO category id of a predicted label (the datasets' `category_ids`), so scores are computed in the data's
    own ids. `update` takes what torchvision's detectors return — one dict of `boxes` (xyxy), `scores` and
    `labels` per image — with the images' ids (or their target dicts). Only the images passed to `update` are
    evaluated; an image seen twice is refused, so merged per-rank states must not overlap (the evaluation
    loaders of diffkd.data.loaders give each rank its own images). COCO's evaluation keeps the 100
    highest-scoring detections per image.

    Detections labelled 0 (the background slot, which RetinaNet and FCOS score like any class, and often pick early
    in training) are dropped before evaluation, as torchvision's reference evaluation effectively does (label 0
    maps to no COCO category); `background_dropped` counts them, for the log. Labels above K are refused.

    `backend`: faster-coco-eval (the default, a C++ port of COCO's evaluation) or pycocotools (COCO's own code);
    both give identical numbers, faster-coco-eval in a third to a half of the time
    (benchmarks/bench_coco_eval.py).
    """

    def __init__(self, ground_truth: Mapping[str, Any], category_ids: Sequence[int], *,
                 backend: str = "faster-coco-eval"):
        self.coco_classes = _coco_api(backend)
        self.backend = backend
        known = {category["id"] for category in ground_truth["categories"]}
        unknown = sorted(set(category_ids) - known)
        if unknown:
            raise ValueError(f"category ids {unknown} are not among the ground truth's categories {sorted(known)}")
        self.ground_truth = ground_truth
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self._image_ids: set[int] = set()
        self._detections: list[np.ndarray] = []  # rows (image id, x, y, width, height, score, category id)
        self.background_dropped = 0  # detections labelled 0, left out of the evaluation

    @classmethod
    def for_dataset(cls, dataset: Any, **options: Any) -> DetectionEvaluator:
        """The evaluator of a dataset with `coco_ground_truth()` and `category_ids` (scenes, COCO folders)."""
        return cls(dataset.coco_ground_truth(), dataset.category_ids, **options)

    def _add_images(self, image_ids: Sequence[int]) -> None:
        repeated = sorted(set(image_ids) & self._image_ids) or sorted(i for i, n in Counter(image_ids).items() if n > 1)
        if repeated:
            raise ValueError(f"image ids {repeated[:5]} were evaluated twice; each image must be passed once (with "
                             f"several ranks, give each rank its own images)")
        self._image_ids.update(image_ids)

    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], targets_or_ids: Sequence[Any]) -> None:
        """Add one batch: per image a dict of `boxes` (k×4 xyxy), `scores` (k) and `labels` (k, 0..K; those
        labelled 0 are dropped and counted), and the images' ids (ints or dicts with an `image_id`)."""
        image_ids = _image_ids_of(targets_or_ids)
        if len(image_ids) != len(predictions):
            raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} images; give one per image")
        rows = []
        for image_id, prediction in zip(image_ids, predictions):
            boxes = prediction["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4).numpy()
            scores = prediction["scores"].detach().to("cpu", torch.float64).reshape(-1).numpy()
            labels = prediction["labels"].detach().to("cpu", torch.int64).reshape(-1).numpy()
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} "
                                 f"labels; a detection needs all three")
            if labels.size and not (labels.min() >= 0 and labels.max() <= len(self.category_ids)):
                raise ValueError(f"image {image_id}: labels must be in 1..{len(self.category_ids)} (0, the "
                                 f"background, is dropped), found {labels.min()}..{labels.max()}")
            foreground = labels > 0
            self.background_dropped += int((~foreground).sum())
            boxes, scores, labels = boxes[foreground], scores[foreground], labels[foreground]
            rows.append(np.column_stack([np.full(len(boxes), image_id, dtype=np.float64), boxes[:, :2],
                                         boxes[:, 2:] - boxes[:, :2], scores,
                                         self.category_ids[labels - 1].astype(np.float64)]))
        self._add_images(image_ids)
        self._detections.extend(rows)

    def state(self) -> dict[str, torch.Tensor]:
        """What this evaluator has seen: `image_ids` (int64) and `detections` (float64 N×7 rows of image id, x, y,
        width, height, score, category id) and `background_dropped`, to gather from every rank and `merge_state` into
        one evaluator."""
        detections = np.concatenate(self._detections) if self._detections else np.zeros((0, 7))
        return {"image_ids": torch.tensor(sorted(self._image_ids), dtype=torch.int64),
                "detections": torch.from_numpy(detections),
                "background_dropped": torch.tensor(self.background_dropped, dtype=torch.int64)}

    def merge_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Add another evaluator's `state()` (another rank's images, none of them seen here)."""
        self._add_images(state["image_ids"].tolist())
        self._detections.append(state["detections"].to(torch.float64).numpy().reshape(-1, 7))
        self.background_dropped += int(state.get("background_dropped", 0))

    def compute(self) -> dict[str, float]:
        """{"map": mAP@[.5:.95], "map50": mAP@.5} in percent over the images seen; NaN when none of them holds a
        ground-truth box (COCO's evaluation has nothing to average then)."""
        if not self._image_ids:
            raise ValueError("no image was evaluated: call update() with the predictions first")
        coco_class, eval_class = self.coco_classes
        detections = np.concatenate(self._detections) if self._detections else np.zeros((0, 7))
        seen = sorted(self._image_ids)
        with contextlib.redirect_stdout(io.StringIO()):  # both libraries print their progress
            ground_truth = coco_class()
            ground_truth.dataset = self.ground_truth
            ground_truth.createIndex()
            unknown = sorted(set(seen) - set(ground_truth.getImgIds()))
            if unknown:
                raise ValueError(f"image ids {unknown[:5]} are not in the ground truth; evaluate the dataset the "
                                 f"evaluator was built for")
            if not len(detections):
                has_boxes = any(not annotation.get("iscrowd", 0) for annotation in ground_truth.loadAnns(
                    ground_truth.getAnnIds(imgIds=seen)))
                return {"map": 0.0, "map50": 0.0} if has_boxes else {"map": math.nan, "map50": math.nan}
            evaluation = eval_class(ground_truth, ground_truth.loadRes(detections), "bbox")
            evaluation.params.imgIds = seen
            evaluation.params.maxDets = [1, 10, MAX_DETECTIONS]
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats = evaluation.stats
        return {name: float(stats[i]) * 100 if stats[i] >= 0 else math.nan for name, i in (("map", 0), ("map50", 1))}


class SegmentationMetric:
    """Mean IoU and pixel accuracy of class maps, from a confusion matrix (rows: ground truth, columns: prediction).

    Pixels whose ground truth is `ignore_index` count nowhere. A class present in neither the ground truth nor the
    predictions of the pixels seen has no IoU (0/0) and is left out of the mean, as in torchvision's and
    mmsegmentation's evaluations. With several ranks, all-reduce `confusion` (a sum) before `compute()`, or
    `merge` another metric into this one.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `prediction` as class ids (shaped as `target`) or as scores with the classes on dim 1
        (B×K×H×W, whose argmax is taken); `target` as class ids (B×H×W) with `ignore_index` for pixels to skip."""
        if prediction.dim() == target.dim() + 1:
            if prediction.shape[1] != self.num_classes:
                raise ValueError(f"scores have {prediction.shape[1]} classes on dim 1, expected {self.num_classes}")
            prediction = prediction.argmax(1)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} shapes differ; "
                             f"upsample the prediction to the target's size first")
        target = target.to(self.confusion.device, torch.int64)
        prediction = prediction.to(self.confusion.device, torch.int64)
        valid = target != self.ignore_index
        target, prediction = target[valid], prediction[valid]
        for name, values in (("target", target), ("prediction", prediction)):
            if values.numel() and not (0 <= int(values.min()) and int(values.max()) < self.num_classes):
                raise ValueError(f"{name} class ids must be in 0..{self.num_classes - 1} (or {self.ignore_index} "
                                 f"in the target), found {int(values.min())}..{int(values.max())}")
        self.confusion += torch.bincount(target * self.num_classes + prediction,
                                         minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def merge(self, other: SegmentationMetric) -> None:
        """Add another metric's pixels (same classes)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class metric into a {self.num_classes}-class one")
        self.confusion += other.confusion.to(self.confusion.device)

    def compute(self) -> dict[str, Any]:
        """{"miou", "pixel_accuracy"} in percent and "iou" (per class, NaN where the class has no pixel in the
        ground truth or the predictions); NaN metrics when no pixel was counted."""
        confusion = self.confusion.double().cpu()
        true_positives = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - true_positives
        iou = torch.where(union > 0, true_positives / union.clamp(min=1), torch.full_like(union, math.nan))
        present = union > 0
        total = confusion.sum()
        return {"miou": float(iou[present].mean()) * 100 if present.any() else math.nan,
                "pixel_accuracy": float(true_positives.sum() / total) * 100 if total > 0 else math.nan,
                "iou": (iou * 100).tolist()}
