"""torchvision semantic segmentation models (DeepLabV3, LR-ASPP) for distillation on the class-score map.

DiffKD distils a segmentation model on its class-score map — the classifier's output before it is upsampled to
the image — with DIST as the distance and no autoencoder (Huang et al. 2023, the Cityscapes experiments).  This
module builds the models and finds that map; :func:`diffkd.distill.build_segmentation_distiller` puts the head
on it.

>>> teacher = build_segmenter("deeplabv3_resnet50", num_classes=11, checkpoint="teacher.pth")
>>> student = build_segmenter("deeplabv3_mobilenet_v3_large", num_classes=11)
>>> distiller = build_segmentation_distiller(method_settings("diffkd", "fashion-scenes", task="segmentation"),
...                                          student, teacher, input_size=(3, 128, 128))
>>> out = distiller(images, masks)            # B×3×H×W normalised images, B×H×W class ids (255 = ignore)
>>> out["loss"].backward()                    # CE on the upsampled output + the DiffKD head on the score maps
>>> metric = SegmentationMetric(11)              # diffkd.metrics
>>> evaluate_segmentation(distiller.student, test_loader, device, metric=metric)   # adds the test pixels
>>> metric.compute()["miou"]

Models come with random weights (nothing is downloaded) or strictly from a user's checkpoint, and without the
auxiliary classifier.  Their BatchNorm layers are torchvision's trainable ``nn.BatchNorm2d``.  Inputs are
normalised by the data pipeline (these models have no internal transform).

The score map is the output of the module ``classifier`` (:data:`SCORE_MAP_TAP`): 1/8 of the input for
DeepLabV3-ResNet (dilated) and LR-ASPP, 1/16 for DeepLabV3-MobileNetV3.  When teacher and student maps differ
in size the distiller average-pools the larger one to the smaller size, as for classification features.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffkd.models.checkpoint import describe_architecture, load_checkpoint, unwrap_model
from diffkd.models.taps import probe_taps

if TYPE_CHECKING:
    from diffkd.metrics import SegmentationMetric

SEGMENTERS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
              "lraspp_mobilenet_v3_large")
SCORE_MAP_TAP = "classifier"  # its output is the class-score map before upsampling
IGNORE_INDEX = 255  # target pixels that count in no loss and no metric
BATCHNORM_MOMENTUM = 0.1


def build_segmenter(name: str, *, num_classes: int, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A torchvision segmentation model by builder name (:data:`SEGMENTERS`), without auxiliary classifier.

    ``num_classes`` includes the background class.  With ``checkpoint`` the weights are loaded strictly from that
    file, otherwise they are random.
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmentation model {name!r}; choose one of {', '.join(SEGMENTERS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    options = dict(weights=None, weights_backbone=None, num_classes=num_classes)
    if not name.startswith("lraspp"):  # LR-ASPP has no auxiliary classifier and refuses the option
        options["aux_loss"] = False
    import torchvision.models.segmentation  # here, not at the top: `import diffkd` stays without torchvision

    model = getattr(torchvision.models.segmentation, name)(**options)
    # torchvision's MobileNetV3 keeps BatchNorm running statistics with momentum 0.01, made for long schedules from
    # pretrained weights.  From random weights the statistics then lag far behind the weights for hundreds of steps,
    # and eval-mode predictions (tests, and a teacher's maps) collapse to the background class while train-mode
    # ones are good.  PyTorch's default 0.1 (as the ResNets use) follows the weights; it changes no parameter.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BATCHNORM_MOMENTUM
    model.arch_name = name  # read by describe_architecture in messages
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def score_map_shape(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(classes, height, width) of the class-score map for one C×H×W input, from one dry forward pass."""
    return probe_taps(model, SCORE_MAP_TAP, input_size)[SCORE_MAP_TAP][1:]


def score_map_output(output) -> torch.Tensor:
    """The upsampled class scores of a segmentation model's output (torchvision's ``{"out": ...}`` or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    raise ValueError(f"a segmentation model must return a B×K×H×W tensor or a dict with 'out', got "
                     f"{type(output).__name__}")


@torch.no_grad()
def evaluate_segmentation(student: nn.Module, loader: Iterable, device: torch.device | str,
                          autocast_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                          *, metric: SegmentationMetric) -> dict[str, torch.Tensor]:
    """The student's confusion matrix over every pixel of ``loader`` (batches of B×C×H×W images and B×H×W class
    ids, ``IGNORE_INDEX`` for pixels that do not count).

    Adds every batch to ``metric`` (a :class:`diffkd.metrics.SegmentationMetric`, or anything with its
    ``update(scores, targets)``) and returns ``{"confusion": metric.confusion}`` (K×K int64, row = truth,
    column = prediction): all-reduce it across ranks, then ``metric.compute()`` gives mIoU.  Runs the student in
    eval mode under ``autocast_context()`` and restores its mode afterwards.
    """
    model = unwrap_model(student)
    was_training = model.training
    model.eval()
    try:
        for images, targets in loader:
            with autocast_context():
                scores = score_map_output(model(images.to(device, non_blocking=True)))
            metric.update(scores.float(), targets.to(device, non_blocking=True))
    finally:
        model.train(was_training)
    return {"confusion": metric.confusion}


def check_same_classes(student_classes: int, teacher_classes: int, student: nn.Module, teacher: nn.Module) -> None:
    """Raise ValueError unless both models predict the same number of classes."""
    if student_classes != teacher_classes:
        raise ValueError(f"the student {describe_architecture(student)} predicts {student_classes} classes and the "
                         f"teacher {describe_architecture(teacher)} {teacher_classes}: class-score maps can only be "
                         f"distilled between models of the same classes (build both with the same num_classes)")
