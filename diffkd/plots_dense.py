"""PNG figures of detection and segmentation results (matplotlib's Agg backend: no display needed).

``draw_detections(images, targets, {"teacher": outputs, "student": outputs}, path, classes)`` draws one row per
image: the ground-truth boxes, then each named set of predicted boxes (each image's ``top_k`` highest-scoring
foreground detections, with their scores: a fixed score threshold shows nothing for a model whose scores are still
low). ``draw_segmentation(images, semantics, {"teacher": maps, ...}, path, classes)`` draws one row per image: the
image, its ground-truth class map, then each named predicted map, with one colour legend. Images may differ in
size: each panel shows its own image.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

_IGNORE_COLOUR = (1.0, 1.0, 1.0)


def _class_colours(num_classes: int) -> np.ndarray:
    """num_classes × 3 RGB in 0..1: black for class 0 (background), tab20's colours for the others."""
    palette = plt.get_cmap("tab20")(np.arange(max(num_classes - 1, 1)) % 20)[:, :3]
    return np.concatenate([np.zeros((1, 3)), palette])[:num_classes]


def _displayable(image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """H×W×3 in 0..1 from a C×H×W tensor in 0..1, or normalised with (mean, std) which are undone."""
    image = image.detach().float().cpu()
    if mean is not None:
        image = image * torch.as_tensor(std).view(-1, 1, 1) + torch.as_tensor(mean).view(-1, 1, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def _grid(rows: int, columns: int):
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows), dpi=100, squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    return figure, axes


def _save(figure, path: str | Path, bottom_margin: float = 0.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout(rect=(0, bottom_margin, 1, 1))
    figure.savefig(path)
    plt.close(figure)
    return path


def _check_lengths(images: Sequence, **per_image: Sequence) -> None:
    for name, values in per_image.items():
        if len(values) != len(images):
            raise ValueError(f"{name} has {len(values)} entries for {len(images)} images: give one per image")


def top_detections(prediction: Mapping[str, torch.Tensor], top_k: int) -> dict[str, torch.Tensor]:
    """The `top_k` highest-scoring detections of one image not labelled 0 (the background), best first."""
    labels, scores = prediction["labels"].detach().cpu(), prediction["scores"].detach().cpu()
    kept = torch.nonzero(labels > 0).flatten()
    kept = kept[scores[kept].argsort(descending=True)[:top_k]]
    return {"boxes": prediction["boxes"].detach().cpu()[kept], "labels": labels[kept], "scores": scores[kept]}


def draw_detections(images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                    predictions: Mapping[str, Sequence[Mapping[str, torch.Tensor]]], path: str | Path,
                    classes: Sequence[str], *, top_k: int = 5, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Path:
    """One PNG: a row per image, the ground truth (targets' boxes and labels) in the first column and each named
    prediction set (dicts of boxes xyxy, scores, labels, as torchvision's detectors return) in the next ones, at
    most `top_k` detections per image: the highest-scoring ones not labelled 0 (the background). Labels index
    `classes` (classes[0] is the background). Returns the path written."""
    _check_lengths(images, targets=targets, **predictions)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    colours = _class_colours(len(classes))
    columns = [("ground truth", targets), *predictions.items()]
    figure, axes = _grid(len(images), len(columns))
    for row, image in enumerate(images):
        for column, (title, per_image) in enumerate(columns):
            axis = axes[row, column]
            axis.imshow(_displayable(image, mean, std))
            found = per_image[row]
            if "scores" in found:  # a prediction: its top_k foreground detections, best first
                found = top_detections(found, top_k)
            boxes, labels = found["boxes"].detach().cpu(), found["labels"].detach().cpu()
            scores = found["scores"].detach().cpu() if "scores" in found else None
            if scores is not None:
                if not len(scores):  # say so: the model returned no box (all under its own score threshold)
                    axis.text(0.5, 0.5, "no detection", transform=axis.transAxes, ha="center", va="center",
                              fontsize=8, color="black", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
            for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
                colour = colours[label % len(colours)] if label else _IGNORE_COLOUR
                # Pixel-edge boxes: pixel c's centre is at c + 0.5, so its left edge is drawn at c - 0.5.
                axis.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1],
                                         fill=False, edgecolor=colour, linewidth=1.2))
                text = classes[label] if label < len(classes) else str(label)
                if scores is not None:
                    text += f" {float(scores[i]):.2f}"
                axis.text(box[0] - 0.5, box[1] - 1.5, text, color="black", fontsize=5,
                          bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.8))
            if row == 0:
                axis.set_title(title if column == 0 else f"{title}\n(top {top_k} per image)", fontsize=8)
    return _save(figure, path)


def _class_map_rgb(semantic: torch.Tensor, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    values = semantic.detach().cpu().long().numpy()
    rgb = colours[np.clip(values, 0, len(colours) - 1)]
    rgb[values == ignore_index] = _IGNORE_COLOUR
    return rgb


def draw_segmentation(images: Sequence[torch.Tensor], semantics: Sequence[torch.Tensor],
                      predictions: Mapping[str, Sequence[torch.Tensor]], path: str | Path, classes: Sequence[str],
                      *, ignore_index: int = 255, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> Path:
    """One PNG: a row per image, the image, its ground-truth class map (H×W ids; `ignore_index` in white) and
    each named predicted map (H×W ids, or C×H×W scores whose argmax is taken), with a legend of `classes`.
    Returns the path written."""
    _check_lengths(images, semantics=semantics, **predictions)
    colours = _class_colours(len(classes))
    columns = [("ground truth", semantics), *predictions.items()]
    figure, axes = _grid(len(images), len(columns) + 1)
    for row, image in enumerate(images):
        axes[row, 0].imshow(_displayable(image, mean, std))
        for column, (title, maps) in enumerate(columns, start=1):
            class_map = maps[row]
            if class_map.dim() == 3:
                class_map = class_map.argmax(0)
            axes[row, column].imshow(_class_map_rgb(class_map, colours, ignore_index), interpolation="nearest")
            if row == 0:
                axes[row, column].set_title(title, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    figure.legend(handles=[Patch(facecolor=colour, label=name) for colour, name in zip(colours, classes)],
                  loc="lower center", ncol=min(len(classes), 6), fontsize=7, frameon=False)
    legend_rows = -(-len(classes) // 6)
    return _save(figure, path, bottom_margin=0.4 * legend_rows / (2.4 * len(images)))
