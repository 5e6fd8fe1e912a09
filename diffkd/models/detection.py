"""torchvision detectors (Faster R-CNN, RetinaNet, FCOS on a ResNet-FPN) for distillation on every FPN level.

DiffKD distils object detectors on each level of the feature pyramid, 256 channels per level, without
autoencoder and with a DiffKD loss weight of 5 (Huang et al. 2023, the COCO experiments: ResNet-101 → ResNet-50
Faster R-CNN, RetinaNet and FCOS).  This module builds the detectors, finds their FPN
levels and matches a student's levels to a teacher's; :func:`diffkd.distill.build_detection_distiller` puts the
heads on them.

>>> teacher = build_detector("fasterrcnn", "resnet50", num_classes=11, image_size=128, checkpoint="teacher.pth")
>>> student = build_detector("fasterrcnn", "resnet18", num_classes=11, image_size=128)
>>> distiller = build_detection_distiller(method_settings("diffkd", "fashion-scenes", task="detection"),
...                                       student, teacher, image_size=128)
>>> out = distiller(images, targets)          # a list of 3×H×W images in 0..1, torchvision target dicts
>>> out["loss"].backward()                    # the detector's losses + every FPN level's DiffKD head
>>> result = evaluate_detection(distiller.student, test_loader, device)   # raw per-image detections
>>> evaluator.update(result["predictions"], result["image_ids"])          # diffkd.metrics.DetectionEvaluator

Choices, and why:

- **Weights.** Models are built with random weights (torchvision is never asked for a download) or loaded
  strictly from a user's checkpoint (:func:`diffkd.models.load_checkpoint`; torchvision's own COCO files fit
  the ResNet-50 builds, whose module tree is torchvision's).
- **BatchNorm.** Every backbone uses trainable ``nn.BatchNorm2d``.  torchvision freezes BatchNorm
  (``FrozenBatchNorm2d``) only under pretrained weights; with random weights a frozen BatchNorm is a fixed
  identity, nothing normalises the activations of a network trained from scratch, and torchvision's own
  builders switch to ``nn.BatchNorm2d`` then too.  A teacher always runs in eval mode, where both compute the
  same thing, and a checkpoint saved with either loads (missing ``num_batches_tracked`` counters are allowed).
  Trainable BatchNorm wants a per-device batch of several images: the detection demo's batches, not COCO's 2.
- **Classes.** ``num_classes`` counts the background index 0 for all three detectors, as torchvision's COCO
  models do (91): labels are 1..K, so 11 for the ten Fashion-MNIST classes.  RetinaNet and FCOS score classes
  with sigmoids, so their channel 0 is simply never a positive.
- **Preprocessing.** The detectors resize and normalise inside the model (``GeneralizedRCNNTransform``).
  Teacher and student must see the very same input for their FPN maps to line up, so both get
  ``min_size = max_size = image_size`` (square images of that side are then not resized) and the same
  ``image_mean`` / ``image_std``; :func:`check_same_preprocessing` refuses a pair that differs.
- **Levels.** Faster R-CNN taps ResNet stages 1–4 plus a max-pooled level (strides 4, 8, 16, 32, 64; keys
  ``0 1 2 3 pool``), RetinaNet and FCOS stages 2–4 plus P6/P7 from P5 (strides 8 … 128; keys ``0 1 2 p6 p7``),
  as torchvision's COCO models.  Strides are measured with a dry forward pass (:func:`fpn_levels`), never
  read from a table, and the distiller pairs each student level with the teacher level of the same stride.

The taps are entries of the backbone's output, ``"backbone[0]"`` … ``"backbone[pool]"`` (see
:mod:`diffkd.models.taps`).
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from diffkd.models.checkpoint import describe_architecture, load_checkpoint, unwrap_model
from diffkd.models.taps import _EvalNoGrad, entry_tap

DETECTORS = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}
DETECTION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# ResNet stages each detector puts into its pyramid, as torchvision's COCO models do.
_PYRAMID_STAGES = {"fasterrcnn": (1, 2, 3, 4), "retinanet": (2, 3, 4), "fcos": (2, 3, 4)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's defaults
FPN_MODULE = "backbone"  # the module whose output is the pyramid: an OrderedDict of levels
_LARGEST_PROBE = 8192
_FCOS_GROUPS = 32  # GroupNorm groups in torchvision's FCOS heads


def _resnet_fpn(backbone: str, architecture: str, fpn_channels: int) -> BackboneWithFPN:
    """A randomly initialised ResNet-FPN laid out exactly as torchvision's detection builders lay it out."""
    body = getattr(torchvision.models, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    stages = _PYRAMID_STAGES[architecture]
    stage1_channels = body.inplanes // 8  # the last stage has 8× the first stage's channels
    extra_blocks = LastLevelMaxPool() if architecture == "fasterrcnn" else LastLevelP6P7(fpn_channels, fpn_channels)
    return BackboneWithFPN(body, {f"layer{stage}": str(index) for index, stage in enumerate(stages)},
                           [stage1_channels * 2 ** (stage - 1) for stage in stages], fpn_channels,
                           extra_blocks=extra_blocks)


def build_detector(architecture: str, backbone: str, *, num_classes: int, image_size: int,
                   image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                   fpn_channels: int = 256, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A torchvision detector (``"fasterrcnn"``, ``"retinanet"`` or ``"fcos"``) on a ResNet-FPN.

    ``num_classes`` includes the background index 0 (labels are 1..num_classes − 1); ``image_size`` is the side of
    the (square) training images: the detector's transform neither up- nor down-scales them.  ``image_mean`` /
    ``image_std`` normalise images given in 0..1 (ImageNet's by default).  With ``checkpoint`` the weights are
    loaded strictly from that file, otherwise they are random.
    """
    if architecture not in DETECTORS:
        raise ValueError(f"unknown detector {architecture!r}; choose one of {', '.join(DETECTORS)}")
    if backbone not in DETECTION_BACKBONES:
        raise ValueError(f"unknown detection backbone {backbone!r}; choose one of {', '.join(DETECTION_BACKBONES)}")
    for name, value in (("num_classes", num_classes), ("image_size", image_size), ("fpn_channels", fpn_channels)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    if architecture == "fcos" and fpn_channels % _FCOS_GROUPS:
        raise ValueError(f"FCOS's heads use GroupNorm with {_FCOS_GROUPS} groups: fpn_channels must be a multiple of "
                         f"{_FCOS_GROUPS}, got {fpn_channels}")
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError(f"image_mean and image_std need one value per RGB channel (std > 0), got "
                         f"{tuple(image_mean)} and {tuple(image_std)}")
    model = DETECTORS[architecture](_resnet_fpn(backbone, architecture, fpn_channels), num_classes=num_classes,
                                    min_size=image_size, max_size=image_size, image_mean=list(image_mean),
                                    image_std=list(image_std))
    model.arch_name = f"{architecture}_{backbone}_fpn"  # read by describe_architecture in messages
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def check_same_preprocessing(student: nn.Module, teacher: nn.Module) -> None:
    """Raise ValueError unless both detectors resize, normalise and pad images identically."""
    def settings(model: nn.Module) -> dict:
        transform = unwrap_model(model).transform
        return {"min_size": tuple(transform.min_size), "max_size": transform.max_size,
                "image_mean": tuple(transform.image_mean), "image_std": tuple(transform.image_std),
                "size_divisible": transform.size_divisible, "fixed_size": transform.fixed_size}

    student_settings, teacher_settings = settings(student), settings(teacher)
    differences = [f"{name} {student_settings[name]} vs {teacher_settings[name]}" for name in student_settings
                   if student_settings[name] != teacher_settings[name]]
    if differences:
        raise ValueError(f"the student and the teacher preprocess images differently (student vs teacher: "
                         f"{'; '.join(differences)}), so their FPN maps would not line up; build both with the same "
                         f"image_size, image_mean and image_std")


@dataclass(frozen=True)
class FPNLevel:
    """One pyramid level: its key in the backbone's output, the tap that reads it, channels, stride, map size."""

    key: str
    tap: str
    channels: int
    stride: int
    size: tuple[int, int]  # at the training image size

    def describe(self) -> str:
        return f"{self.tap} {self.channels}×{self.size[0]}×{self.size[1]} (stride {self.stride})"


def _padded(side: int, divisor: int) -> int:
    return int(math.ceil(side / divisor) * divisor)


def _pyramid_shapes(backbone: nn.Module, side: int) -> dict[str, tuple[int, ...]]:
    reference = next(backbone.parameters())
    x = torch.zeros(1, 3, side, side, device=reference.device, dtype=reference.dtype)
    with _EvalNoGrad(backbone):
        return {str(key): tuple(value.shape[1:]) for key, value in backbone(x).items()}


def fpn_levels(detector: nn.Module, image_size: int) -> list[FPNLevel]:
    """The detector's FPN levels, finest first, from dry forward passes of its backbone.

    Map sizes are those of ``image_size`` images (padded as the transform pads them).  Strides come from an input
    large enough that even the coarsest level is at least 2×2 (at 64×64 RetinaNet's P6 and P7 are both 1×1 and
    their strides could not be told apart), doubling the input until it is.
    """
    target = unwrap_model(detector)
    divisor = target.transform.size_divisible
    side = _padded(image_size, divisor)
    shapes = _pyramid_shapes(target.backbone, side)
    probe_side, probe_shapes = side, shapes
    while min(min(shape[1:]) for shape in probe_shapes.values()) < 2:
        probe_side *= 2
        if probe_side > _LARGEST_PROBE:
            raise ValueError(f"cannot measure the FPN strides of {describe_architecture(target)}: its coarsest level "
                             f"stays below 2×2 even for {_LARGEST_PROBE}×{_LARGEST_PROBE} inputs")
        probe_shapes = _pyramid_shapes(target.backbone, probe_side)
    levels = []
    for key, (channels, height, width) in shapes.items():
        probe_height = probe_shapes[key][1]
        if probe_side % probe_height:
            raise ValueError(f"FPN level {key!r} of {describe_architecture(target)} is {probe_height} high for a "
                             f"{probe_side}-pixel input: not an integer stride")
        levels.append(FPNLevel(key, entry_tap(FPN_MODULE, key), channels, probe_side // probe_height, (height, width)))
    return sorted(levels, key=lambda level: level.stride)


def match_fpn_levels(student_levels: Iterable[FPNLevel],
                     teacher_levels: Iterable[FPNLevel]) -> list[tuple[FPNLevel, FPNLevel]]:
    """(student level, teacher level) pairs of equal stride; ValueError when the pyramids do not match."""
    student_levels, teacher_levels = list(student_levels), list(teacher_levels)
    by_stride = {}
    for who, levels in (("student", student_levels), ("teacher", teacher_levels)):
        strides = [level.stride for level in levels]
        if len(set(strides)) != len(strides):
            raise ValueError(f"the {who}'s FPN has several levels of the same stride ({strides}); levels are "
                             f"matched by stride, so each stride must occur once")
        by_stride[who] = {level.stride: level for level in levels}
    if set(by_stride["student"]) != set(by_stride["teacher"]):
        raise ValueError(f"the student's FPN levels have strides {sorted(by_stride['student'])} and the teacher's "
                         f"{sorted(by_stride['teacher'])}: each student level is distilled from the teacher level "
                         f"of the same stride, so both need the same levels (build both as the same detector "
                         f"type: Faster R-CNN has strides 4–64, RetinaNet and FCOS 8–128)")
    pairs = []
    for level in student_levels:
        teacher_level = by_stride["teacher"][level.stride]
        if level.channels != teacher_level.channels:
            raise ValueError(f"FPN level of stride {level.stride}: the student has {level.channels} channels and "
                             f"the teacher {teacher_level.channels}; build both with the same fpn_channels")
        pairs.append((level, teacher_level))
    return pairs


@torch.no_grad()
def evaluate_detection(student: nn.Module, loader: Iterable, device: torch.device | str,
                       autocast_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                       ) -> dict[str, list]:
    """The student's raw detections on every image of ``loader`` (batches of (images, targets) as
    :class:`diffkd.distill.DetectionDistiller` takes them; every target has an ``image_id``).

    Returns ``{"predictions": [...], "image_ids": [...]}``, one entry per image in loader order: torchvision's
    detection dicts (``boxes`` N×4 x1y1x2y2 in input pixels, ``scores``, ``labels``) on the CPU in float32, and
    the images' ids — what :meth:`diffkd.metrics.DetectionEvaluator.update` takes.  Runs the student in eval mode
    under ``autocast_context()`` and restores its mode afterwards.
    """
    model = unwrap_model(student)
    was_training = model.training
    model.eval()
    predictions, image_ids = [], []
    try:
        for images, targets in loader:
            if any("image_id" not in target for target in targets):
                raise ValueError("every target needs an 'image_id' to match its detections with the ground truth")
            with autocast_context():
                detections = model([image.to(device, non_blocking=True) for image in images])
            predictions += [{key: value.cpu().float() if value.is_floating_point() else value.cpu()
                             for key, value in detection.items()} for detection in detections]
            image_ids += [int(target["image_id"]) for target in targets]
    finally:
        model.train(was_training)
    return {"predictions": predictions, "image_ids": image_ids}
