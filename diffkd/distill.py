"""The Distillers that train a student beside a frozen teacher (the methods' settings and heads: diffkd.methods).

Each Distiller is a thin layer over :class:`diffkd.DiffKDLoss`: it taps the models, runs the task loss
(``criterion``) and hands the tapped tensors to the loss, which matches sizes, runs the heads and sums.

A *head* distils one pair of tensors and returns a dict with ``loss`` (its weighted contribution) and its named
terms.  Heads are named, and each name is bound (:class:`HeadBinding`) to a student tensor and a teacher tensor:
a *tap* — a module's output, or one entry of it, read with forward hooks (:mod:`diffkd.models.taps`) — or the
model's logits.  A Distiller owns the student and every head, so one ``parameters()`` call reaches everything the
optimizer must train; the teacher is deliberately *not* a submodule, so neither ``state_dict``, the optimizer nor
DDP ever sees it.

One Distiller per task, each with its builder:

- classification — :class:`Distiller`, :func:`build_distiller`: heads ``feature`` (the last feature map before
  pooling) and ``logit`` (the classifier outputs);
- detection — :class:`DetectionDistiller`, :func:`build_detection_distiller`: a head ``fpn.<level>`` on every FPN
  level (``fpn.0`` … ``fpn.pool``), each matched to the teacher level of the same stride, or one head ``fpn``
  shared by every level;
- segmentation — :class:`SegmentationDistiller`, :func:`build_segmentation_distiller`: a head ``score_map`` on
  the class-score map before upsampling.

The contract every Distiller keeps with a training loop:

- ``forward(images, targets) -> dict``: ``"loss"`` (the tensor to optimise) and a detached 0-dim tensor for every
  named term — the task's (``ce_loss``, or ``task_loss`` for a ``criterion`` of one's own; for detection
  ``detection_loss`` and ``detection/<torchvision's loss name>``) and ``<head>/<term>`` for every head
  (``kd_loss``, ``diffusion_loss``, ``ae_loss``, ``gamma``, …; per-sample terms as batch means).
  Classification adds ``logits`` (the student's, not detached).  Nothing in it synchronises with the host (a
  detector's own loss code may).
- ``.student``, ``.heads`` (an ``nn.ModuleDict``; dotted head names nest: ``heads.fpn.0``, so walk
  ``head_modules()`` rather than ``heads.items()``), ``.teacher`` (not a submodule; kept in eval mode),
  ``.bindings``, ``trainable_parameters()`` (for the optimizer) and ``extra_parameter_count()`` (the heads:
  training-time only).
- Loss weights come from :func:`diffkd.methods.method_settings` (``task=`` picks the detection or segmentation
  defaults).
- The student is evaluated apart from the Distiller: classification by its logits, detection with
  :func:`diffkd.models.evaluate_detection` (raw per-image detections for :class:`diffkd.metrics.DetectionEvaluator`),
  segmentation with :func:`diffkd.models.evaluate_segmentation` (a confusion matrix in a
  :class:`diffkd.metrics.SegmentationMetric`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffkd.loss import DiffKDLoss, check_pair_name
from diffkd.models.checkpoint import unwrap_model
from diffkd.models.segmentation import (IGNORE_INDEX, SCORE_MAP_TAP, check_same_classes, score_map_output,
                                        score_map_shape)
from diffkd.models.taps import TapSet, describe_spatial_match, probe_taps
from diffkd.methods import (HEAD_KINDS, TASK_METHODS, MethodSettings, build_heads, diffkd_head, feature_map_head,
                            logit_head)

# ---- the Distillers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadBinding:
    """What one named head distils.

    ``student`` / ``teacher``: a tap of that model (``"layer4"``, ``"pool4:input"``, ``"backbone[0]"``; see
    :mod:`diffkd.models.taps`), or None for the model's output (a classifier's logits).  ``head``: the module in
    ``Distiller.heads`` that does it — None for the module of the binding's own name; several bindings may name one
    module to share it.  ``weight`` multiplies that head's loss.
    """

    student: str | None
    teacher: str | None
    head: str | None = None
    weight: float = 1.0

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"a head's weight must be >= 0, got {self.weight!r}")


class Distiller(nn.Module):
    """A trainable classifier and its distillation heads, beside a frozen teacher.

    ``heads`` maps names to head modules (``head(student, teacher) -> dict`` with ``loss``).  ``bindings`` says what
    each named head distils (:class:`HeadBinding`); without one, a head named ``"feature"`` distils the maps of the
    modules ``student_feature`` / ``teacher_feature`` (as found by :func:`diffkd.models.default_taps`) and a head
    named ``"logit"`` the logits.  Heads run in the order of ``bindings``, then of ``heads``.  Token outputs
    (B×N×C) become maps, and of two maps of different sizes the larger is average-pooled to the smaller size.
    ``criterion(logits, targets)`` is the task loss (default: cross-entropy, logged as ``ce_loss``; one's own is
    logged as ``task_loss``), weighted by ``ce_weight``.

    ``forward(images, targets)`` returns ``loss`` (to optimise), ``logits`` (the student's), ``ce_loss`` and
    ``<head>/<term>`` for every scalar term of every head (per-sample terms such as ``gamma`` as batch means).
    ``distill_loss`` is the :class:`diffkd.DiffKDLoss` that runs the heads (None without heads); its ``heads``
    are this module's, so the state_dict keys are ``student.*`` and ``heads.<name>.*``.
    """

    task = "classification"
    _binds_outputs = True  # heads may distil the models' outputs (logits); dense tasks distil taps only

    def __init__(self, teacher: nn.Module | None, student: nn.Module, heads: Mapping[str, nn.Module] | None = None,
                 *, bindings: Mapping[str, HeadBinding] | None = None, teacher_feature: str | None = None,
                 student_feature: str | None = None, ce_weight: float = 1.0,
                 criterion: Callable | None = None):
        super().__init__()
        heads = dict(heads or {})
        if heads and teacher is None:
            raise ValueError(f"heads {sorted(heads)} need a teacher, got teacher=None")
        self.student = student
        self.bindings = self._resolve_bindings(heads, dict(bindings or {}), student_feature, teacher_feature)
        distill_loss = DiffKDLoss.from_heads(
            heads, head_of={name: binding.head for name, binding in self.bindings.items()},
            weights={name: binding.weight for name, binding in self.bindings.items()},
            note_pooling=False) if heads else None  # the builders say at start-up what gets pooled
        self.heads = distill_loss.heads if distill_loss is not None else nn.ModuleDict()
        # Not a submodule: its heads are registered here as `heads`, which keeps the checkpoints' keys.
        object.__setattr__(self, "distill_loss", distill_loss)
        self.ce_weight = ce_weight
        self.criterion = criterion
        # Not a submodule on purpose: state_dict, parameters(), the optimizer and DDP must never see the teacher.
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self._student_taps = self._tap_set(student, [b.student for b in self.bindings.values()])
        self._teacher_taps = self._tap_set(teacher, [b.teacher for b in self.bindings.values()])

    def _resolve_bindings(self, heads: dict, bindings: dict, student_feature: str | None,
                          teacher_feature: str | None) -> dict[str, HeadBinding]:
        for name, binding in bindings.items():
            check_pair_name(name)
            module_name = binding.head or name
            if module_name not in heads:
                raise ValueError(f"binding {name!r} uses head {module_name!r}, which is not one of the heads "
                                 f"({', '.join(heads) or 'none'})")
        used = {binding.head or name for name, binding in bindings.items()}
        unbound = [name for name in heads if name not in used]
        unknown = [name for name in unbound if name not in HEAD_KINDS]
        if unknown:
            raise ValueError(f"unknown head names {unknown}: without a binding, heads are keyed by what they distil "
                             f"({' or '.join(HEAD_KINDS)}); bind other heads with "
                             f"bindings={{name: HeadBinding(student_tap, teacher_tap)}}")
        if "feature" in unbound:
            if not (teacher_feature and student_feature):
                raise ValueError("a feature head needs teacher_feature and student_feature (module names whose "
                                 f"outputs are the feature maps), got {teacher_feature!r} and {student_feature!r}")
            bindings["feature"] = HeadBinding(student_feature, teacher_feature)
        if "logit" in unbound:
            bindings["logit"] = HeadBinding(None, None)
        if not self._binds_outputs:
            outputs = [name for name, binding in bindings.items() if binding.student is None or binding.teacher is None]
            if outputs:
                raise ValueError(f"heads {outputs} are bound to the models' outputs, which a {self.task} distiller "
                                 f"does not distil; bind them to taps (module names, e.g. 'backbone[0]')")
        return bindings

    @staticmethod
    def _tap_set(model: nn.Module | None, taps: list[str | None]) -> TapSet | None:
        taps = [tap for tap in taps if tap is not None]
        return TapSet(model, taps) if taps else None

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() and channels-last conversions move the teacher along with the student.
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # always: its BatchNorm statistics are part of what is distilled
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and every head's parameters: what the optimizer must see."""
        return [p for p in self.parameters() if p.requires_grad]

    def head_modules(self) -> dict[str, nn.Module]:
        """Every head module by its name in :attr:`heads` (dotted where names nest: ``fpn.0``), each once even when
        bindings share it; ``heads.set_submodule(name, module)`` replaces one (e.g. by a CUDA-graphed wrapper)."""
        return self.distill_loss.head_modules() if self.distill_loss is not None else {}

    def extra_parameter_count(self) -> int:
        """Parameters that exist only for training (the heads); the deployed student does not carry them."""
        return sum(p.numel() for p in self.heads.parameters())

    # ---- what differs between tasks --------------------------------------------------------------------------
    def _teacher_forward(self, images):
        """Runs the teacher (under no_grad) far enough for every tap; returns its output (or None)."""
        return self.teacher(images)

    def _student_forward(self, images, targets) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], torch.Tensor]:
        """(student output for output-bound heads, logged task terms, weighted task loss)."""
        logits = self.student(images)
        name, task_loss = self._task_loss(logits, targets)
        return logits, {"logits": logits, name: task_loss.detach()}, self.ce_weight * task_loss

    def _task_loss(self, scores: torch.Tensor, targets, **cross_entropy_options) -> tuple[str, torch.Tensor]:
        """(its logged name, the task loss): ``criterion``'s, or the cross-entropy of float32 scores."""
        if self.criterion is not None:
            return "task_loss", self.criterion(scores, targets)
        return "ce_loss", F.cross_entropy(scores.float(), targets, **cross_entropy_options)

    # ---- the common part -------------------------------------------------------------------------------------
    def forward(self, images, targets) -> dict[str, torch.Tensor]:
        teacher_output, teacher_tensors = None, {}
        if self.bindings:
            with torch.no_grad():
                teacher_output = self._teacher_forward(images)
                if self._teacher_taps is not None:
                    teacher_tensors = {tap: self._teacher_taps.map(tap) for tap in self._teacher_taps.taps}
                    self._teacher_taps.clear()
        student_output, out, loss = self._student_forward(images, targets)
        if self.distill_loss is not None:
            student_feats, teacher_feats = {}, {}
            for name, binding in self.bindings.items():
                student_feats[name] = (student_output if binding.student is None
                                       else self._student_taps.map(binding.student))
                teacher_feats[name] = teacher_output if binding.teacher is None else teacher_tensors[binding.teacher]
            out.update(self.distill_loss(student_feats, teacher_feats, task_loss=loss))  # adds "loss", the total
        else:
            out["loss"] = loss
        if self._student_taps is not None:
            self._student_taps.clear()
        return out


class DetectionDistiller(Distiller):
    """A torchvision detector (student, train mode) and heads on its FPN levels, beside a frozen detector.

    ``forward(images, targets)`` takes what the detector takes — a list of 3×H×W images (or a B×3×H×W tensor) and
    a list of target dicts with ``boxes`` and ``labels`` — and returns ``loss`` (``ce_weight`` × the sum of the
    detector's losses + every head's loss), ``detection_loss`` (that sum), ``detection/<name>`` for each of the
    detector's losses (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg`` for
    Faster R-CNN; ``classification``, ``bbox_regression`` (, ``bbox_ctrness``) for RetinaNet / FCOS) and
    ``<head>/<term>`` per head.  ``criterion(losses)`` turns the detector's loss dict into the detection loss
    (default: their sum).  The teacher runs under no_grad, in eval mode: a torchvision detector only its transform
    and backbone, any other detector its whole forward on the list of images.
    """

    task = "detection"
    _binds_outputs = False

    def _teacher_forward(self, images):
        teacher = unwrap_model(self.teacher)
        if not (hasattr(teacher, "transform") and hasattr(teacher, "backbone")):
            return teacher(list(images))
        image_list, _ = teacher.transform(list(images))
        teacher.backbone(image_list.tensors)  # the taps read the FPN levels

    def _student_forward(self, images, targets):
        if not self.training:
            raise ValueError("DetectionDistiller.forward computes the training losses, which torchvision's detectors "
                             "return only in train mode: call .train() first (evaluate the student with "
                             "diffkd.models.evaluate_detection)")
        losses = self.student(list(images), targets)
        detection_loss = sum(losses.values()) if self.criterion is None else self.criterion(losses)
        out = {f"detection/{name}": value.detach() for name, value in losses.items()}
        out["detection_loss"] = detection_loss.detach()
        return None, out, self.ce_weight * detection_loss


class SegmentationDistiller(Distiller):
    """A segmentation model (student) and a head on its class-score map, beside a frozen segmentation model.

    ``forward(images, targets)`` takes B×3×H×W images and B×H×W class ids (``ignore_index`` pixels count in no
    loss) and returns ``loss`` (``ce_weight`` × the cross-entropy of the upsampled student output + the heads'
    losses), ``ce_loss`` and ``<head>/<term>`` per head.  ``criterion(scores, targets)`` replaces the
    cross-entropy (logged as ``task_loss``; ``ignore_index`` is then its business).
    """

    task = "segmentation"
    _binds_outputs = False

    def __init__(self, teacher: nn.Module | None, student: nn.Module, heads: Mapping[str, nn.Module] | None = None,
                 *, bindings: Mapping[str, HeadBinding] | None = None, ce_weight: float = 1.0,
                 ignore_index: int = IGNORE_INDEX, criterion: Callable | None = None):
        super().__init__(teacher, student, heads, bindings=bindings, ce_weight=ce_weight, criterion=criterion)
        self.ignore_index = ignore_index

    def _student_forward(self, images, targets):
        scores = score_map_output(self.student(images))
        name, task_loss = self._task_loss(scores, targets, ignore_index=self.ignore_index)
        return None, {name: task_loss.detach()}, self.ce_weight * task_loss


# ---- builders --------------------------------------------------------------------------------------------------
def _tap_shapes(model: nn.Module, taps: tuple[str, str], input_size: tuple[int, int, int]) -> dict[str, tuple]:
    """Shapes (batch 1) of the model's feature map and logits, from one dry forward pass."""
    feature_tap, logits_tap = taps
    shapes = probe_taps(model, [feature_tap, logits_tap], input_size)
    return {"feature": shapes[feature_tap], "logit": shapes[logits_tap]}


def _describe_logit_method(settings: MethodSettings, classes: int) -> str:
    if settings.method == "diffkd":
        return f"logit head: {classes} classes"
    distance = ("KL divergence" if settings.method == "kd"
                else f"DIST (β = {settings.dist_beta:g}, γ = {settings.dist_gamma:g})")
    return (f"{settings.method}: {distance} between the student's and the teacher's logits ({classes} classes, "
            f"τ = {settings.kd_temperature:g})")


def _require_teacher(settings: MethodSettings, teacher: nn.Module | None) -> None:
    if teacher is None:
        raise ValueError(f"method {settings.method!r} needs a teacher; pass --teacher (or use --method none)")


def build_distiller(settings: MethodSettings, student: nn.Module, teacher: nn.Module | None = None, *,
                    student_taps: tuple[str, str] | None = None, teacher_taps: tuple[str, str] | None = None,
                    input_size: tuple[int, int, int], log: Callable[[str], None] = print) -> Distiller:
    """A classification Distiller for ``settings``; channels and sizes come from one dry forward pass of each model.

    ``*_taps`` are (feature module, logits module) names, e.g. from :func:`diffkd.models.default_taps`;
    ``input_size`` is C×H×W of one image.  ``log`` receives one line per start-up fact worth knowing (the
    tapped shapes, pooling of a larger student map).
    """
    kinds = settings.head_kinds
    if not kinds:
        return Distiller(None, student, ce_weight=settings.ce_weight)
    _require_teacher(settings, teacher)
    if student_taps is None or teacher_taps is None:
        raise ValueError(f"method {settings.method!r} needs student_taps and teacher_taps "
                         "((feature module, logits module) names of each model)")
    student_shapes = _tap_shapes(student, student_taps, input_size)
    teacher_shapes = _tap_shapes(teacher, teacher_taps, input_size)
    if "feature" in kinds:
        s_shape, t_shape = student_shapes["feature"], teacher_shapes["feature"]
        log(f"feature head: student {student_taps[0]} {_format_shape(s_shape[1:])} -> teacher {teacher_taps[0]} "
            f"{_format_shape(t_shape[1:])}")
        pooling = describe_spatial_match(s_shape, t_shape)
        if pooling:
            log(f"note: {pooling}")
    if "logit" in kinds:
        log(_describe_logit_method(settings, student_shapes["logit"][1]))
    heads = build_heads(settings, {k: v[1:] for k, v in student_shapes.items()},
                        {k: v[1:] for k, v in teacher_shapes.items()})
    return Distiller(teacher, student, heads, teacher_feature=teacher_taps[0], student_feature=student_taps[0],
                     ce_weight=settings.ce_weight)


def _check_method(settings: MethodSettings, task: str) -> None:
    if settings.method not in TASK_METHODS[task]:
        raise ValueError(f"method {settings.method!r} does not apply to {task}; choose one of "
                         f"{', '.join(TASK_METHODS[task])}")


def _check_head_weights(head_weights: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    head_weights = dict(head_weights or {})
    unknown = sorted(set(head_weights) - set(names))
    if unknown:
        raise ValueError(f"head_weights names unknown heads {unknown}; the heads are {', '.join(names)}")
    return head_weights


def build_detection_distiller(settings: MethodSettings, student: nn.Module, teacher: nn.Module | None = None, *,
                              image_size: int, share_head: bool = False,
                              head_weights: Mapping[str, float] | None = None,
                              log: Callable[[str], None] = print) -> DetectionDistiller:
    """A DetectionDistiller for two detectors of :func:`diffkd.models.build_detector` (methods none, mse, diffkd).

    Every student FPN level gets a head ``fpn.<key>`` (``fpn.0`` … ``fpn.pool``) distilling it from the teacher
    level of the same stride, as measured by dry forward passes at ``image_size``; ``share_head=True`` uses one
    head ``fpn`` for every level instead (the paper does not say which it used; each level's terms are still
    logged under its own name).  ``head_weights`` scales named levels' losses (default 1).  ValueError when the
    detectors preprocess differently or their levels do not match (strides or channels).
    """
    from diffkd.models.detection import check_same_preprocessing, fpn_levels, match_fpn_levels  # torchvision: lazily

    _check_method(settings, "detection")
    if settings.method == "none":
        return DetectionDistiller(None, student, ce_weight=settings.ce_weight)
    _require_teacher(settings, teacher)
    check_same_preprocessing(student, teacher)
    pairs = match_fpn_levels(fpn_levels(student, image_size), fpn_levels(teacher, image_size))
    names = [f"fpn.{student_level.key}" for student_level, _ in pairs]
    weights = _check_head_weights(head_weights, names)
    bindings = {name: HeadBinding(student_level.tap, teacher_level.tap, head="fpn" if share_head else None,
                                  weight=weights.get(name, 1.0))
                for name, (student_level, teacher_level) in zip(names, pairs)}
    if share_head:
        channel_counts = sorted({level.channels for pair in pairs for level in pair})
        if len(channel_counts) > 1:
            raise ValueError(f"one shared head needs the same channels on every FPN level, got {channel_counts}")
        heads = {"fpn": feature_map_head(settings, channel_counts[0], channel_counts[0])}
    else:
        heads = {name: feature_map_head(settings, student_level.channels, teacher_level.channels)
                 for name, (student_level, teacher_level) in zip(names, pairs)}
    sharing = "one head shared by all levels" if share_head else "one head per level"
    log(f"detection {settings.method} heads: {len(pairs)} FPN levels matched by stride, {sharing}")
    for name, (student_level, teacher_level) in zip(names, pairs):
        log(f"  {name}: student {student_level.describe()} -> teacher {teacher_level.describe()}")
    return DetectionDistiller(teacher, student, heads, bindings=bindings, ce_weight=settings.ce_weight)


SCORE_MAP_HEAD = "score_map"


def build_segmentation_distiller(settings: MethodSettings, student: nn.Module, teacher: nn.Module | None = None, *,
                                 input_size: tuple[int, int, int], ignore_index: int = IGNORE_INDEX,
                                 log: Callable[[str], None] = print) -> SegmentationDistiller:
    """A SegmentationDistiller for two models of :func:`diffkd.models.build_segmenter` (methods none, kd, dist,
    diffkd): one head ``score_map`` on the class-score maps (the ``classifier`` outputs, before upsampling).

    ``kd`` is pixel-wise KL, ``dist`` is DIST per pixel, ``diffkd`` a spatial DiffKD head whose distance is
    ``settings.logit_distance`` (DIST by default for segmentation).  ``input_size`` is C×H×W of one training image
    (for the dry forward passes that measure the maps).  When the maps differ in size the larger is average-pooled
    to the smaller size, which ``log`` reports.  ValueError when the models predict different numbers of classes.
    """
    _check_method(settings, "segmentation")
    if settings.method == "none":
        return SegmentationDistiller(None, student, ce_weight=settings.ce_weight, ignore_index=ignore_index)
    _require_teacher(settings, teacher)
    student_shape, teacher_shape = score_map_shape(student, input_size), score_map_shape(teacher, input_size)
    check_same_classes(student_shape[0], teacher_shape[0], student, teacher)
    if settings.method == "diffkd":
        head = diffkd_head(settings, student_shape[0], teacher_shape[0], spatial=True,
                            distance=settings.logit_distance, autoencoder=False)
        what = f"DiffKD, {settings.logit_distance} distance"
    else:
        head = logit_head(settings)
        what = "pixel-wise KL divergence" if settings.method == "kd" else "DIST per pixel"
    log(f"score-map head ({what}, τ = {settings.kd_temperature:g}): student {SCORE_MAP_TAP} "
        f"{_format_shape(student_shape)} -> teacher {SCORE_MAP_TAP} {_format_shape(teacher_shape)}")
    pooling = describe_spatial_match((1, *student_shape), (1, *teacher_shape))
    if pooling:  # worded for feature maps and DiffKD heads
        log(f"note: {pooling.replace('feature map', 'score map').replace('the DiffKD head', 'the score-map head')}")
    return SegmentationDistiller(teacher, student, {SCORE_MAP_HEAD: head},
                                 bindings={SCORE_MAP_HEAD: HeadBinding(SCORE_MAP_TAP, SCORE_MAP_TAP)},
                                 ce_weight=settings.ce_weight, ignore_index=ignore_index)


def _format_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)
