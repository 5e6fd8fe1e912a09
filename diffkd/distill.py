"""Distillation methods (SPEC §6) and the Distiller that trains a student beside a frozen teacher.

A *head* distils one pair of tensors and returns a dict with ``loss`` (its weighted contribution) and its named
terms.  Heads are keyed by what they distil: ``"feature"`` (the last feature map before pooling, SPEC §5) or
``"logit"`` (the classifier outputs).  The Distiller owns the student and every head, so one ``parameters()``
call reaches everything the optimizer must train; the teacher is deliberately *not* a submodule, so neither
``state_dict``, the optimizer nor DDP ever sees it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffkd.losses import dist_loss, kl_div_loss, mse_loss
from diffkd.models import FeatureTaps, describe_spatial_match, match_spatial, probe_taps
from diffkd.modules import DiffKDHead

METHODS = ("none", "kd", "dist", "mse", "diffkd")
HEAD_KINDS = ("feature", "logit")
HEAD_SELECTIONS = {"feature": ("feature",), "logit": ("logit",), "both": ("feature", "logit")}
LOGIT_DISTANCES = ("kl", "dist")


@dataclass(frozen=True)
class MethodSettings:
    """Everything that defines a distillation method's losses; ``method_settings`` fills the recipe defaults."""

    method: str = "diffkd"
    ce_weight: float = 1.0
    kd_weight: float = 1.0          # the KD/DIST/MSE term, or each DiffKD head's KD term
    kd_temperature: float = 1.0     # τ of KL and DIST (DiffKD's logit head included)
    dist_beta: float = 1.0          # DIST inter-class weight
    dist_gamma: float = 1.0         # DIST intra-class weight
    diffusion_weight: float = 1.0   # DiffKD: the denoiser's diffusion loss
    ae_weight: float = 1.0          # DiffKD: the feature head's autoencoder loss
    heads: str = "both"             # DiffKD: feature | logit | both
    ae_channels: int = 0            # DiffKD feature head's autoencoder width; 0 = no autoencoder
    nfe: int = 5                    # DiffKD: denoising steps
    anm: bool = True                # DiffKD: adaptive noise matching
    logit_distance: str = "kl"      # DiffKD logit head: kl, or dist (the paper's DiffKD†)
    timestep_start: str = "official"
    backend: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.heads not in HEAD_SELECTIONS:
            raise ValueError(f"unknown heads {self.heads!r}; choose one of {', '.join(HEAD_SELECTIONS)}")
        if self.logit_distance not in LOGIT_DISTANCES:
            raise ValueError(f"unknown logit distance {self.logit_distance!r}; choose one of "
                             f"{', '.join(LOGIT_DISTANCES)}")
        if not isinstance(self.ae_channels, int) or self.ae_channels < 0:
            raise ValueError(f"ae_channels must be an integer >= 0 (0 = no autoencoder), got {self.ae_channels!r}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature!r}")
        for name in ("ce_weight", "kd_weight", "diffusion_weight", "ae_weight", "dist_beta", "dist_gamma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def head_kinds(self) -> tuple[str, ...]:
        """The tensors this method distils."""
        return {"none": (), "kd": ("logit",), "dist": ("logit",), "mse": ("feature",),
                "diffkd": HEAD_SELECTIONS[self.heads]}[self.method]


# SPEC §6's loss weights.  The CIFAR-100 column also serves Fashion-MNIST (small images, small models).
_RECIPE_COLUMN = {"cifar100": "cifar", "fashion-mnist": "cifar", "imagenet": "imagenet"}
_METHOD_DEFAULTS = {
    ("none", "cifar"): dict(ce_weight=1.0),
    ("none", "imagenet"): dict(ce_weight=1.0),
    ("kd", "cifar"): dict(ce_weight=0.1, kd_weight=0.9, kd_temperature=4.0),
    ("kd", "imagenet"): dict(ce_weight=0.5, kd_weight=0.5, kd_temperature=1.0),
    ("dist", "cifar"): dict(ce_weight=1.0, kd_weight=2.0, kd_temperature=4.0, dist_beta=1.0, dist_gamma=1.0),
    ("dist", "imagenet"): dict(ce_weight=1.0, kd_weight=1.0, kd_temperature=1.0, dist_beta=1.0, dist_gamma=1.0),
    ("mse", "cifar"): dict(ce_weight=1.0, kd_weight=1.0),
    ("mse", "imagenet"): dict(ce_weight=1.0, kd_weight=1.0),
    ("diffkd", "cifar"): dict(ce_weight=1.0, kd_weight=1.0, diffusion_weight=1.0, ae_weight=1.0, kd_temperature=1.0,
                              ae_channels=0),
    ("diffkd", "imagenet"): dict(ce_weight=1.0, kd_weight=1.0, diffusion_weight=1.0, ae_weight=1.0,
                                 kd_temperature=1.0, ae_channels=1024),
}
SETTING_NAMES = tuple(f.name for f in fields(MethodSettings))


def method_settings(method: str, dataset: str, **overrides) -> MethodSettings:
    """The method's settings for ``dataset`` (SPEC §6 defaults), with ``overrides`` (None values ignored)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if dataset not in _RECIPE_COLUMN:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(_RECIPE_COLUMN)}")
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown method settings {unknown}; expected some of {', '.join(SETTING_NAMES)}")
    values = dict(_METHOD_DEFAULTS[method, _RECIPE_COLUMN[dataset]])
    values.update({name: value for name, value in overrides.items() if value is not None})
    values["method"] = method
    return MethodSettings(**values)


class LogitDistillation(nn.Module):
    """KL (τ²·KL, batchmean) or DIST between the student's and the teacher's logits."""

    def __init__(self, distance: str = "kl", *, weight: float = 1.0, temperature: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0):
        super().__init__()
        if distance not in LOGIT_DISTANCES:
            raise ValueError(f"unknown logit distance {distance!r}; choose one of {', '.join(LOGIT_DISTANCES)}")
        self.distance, self.weight, self.temperature, self.beta, self.gamma = distance, weight, temperature, beta, gamma

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, weight={self.weight}, temperature={self.temperature}"

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.distance == "kl":
            kd_loss = kl_div_loss(student_logits, teacher_logits, self.temperature)
        else:
            kd_loss = dist_loss(student_logits, teacher_logits, self.beta, self.gamma, self.temperature)
        return {"loss": self.weight * kd_loss, "kd_loss": kd_loss}


class FeatureRegression(nn.Module):
    """The ``mse`` baseline: a 1×1 conv (student → teacher channels) + BatchNorm, then MSE to the teacher map."""

    def __init__(self, student_channels: int, teacher_channels: int, *, weight: float = 1.0):
        super().__init__()
        self.weight = weight
        self.proj = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, kernel_size=1),
                                  nn.BatchNorm2d(teacher_channels))

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> dict[str, torch.Tensor]:
        kd_loss = mse_loss(self.proj(student_map), teacher_map)
        return {"loss": self.weight * kd_loss, "kd_loss": kd_loss}


# Per-head outputs that are tensors to inspect, not numbers to log.
_UNLOGGED_TERMS = ("loss", "denoised", "target")


class Distiller(nn.Module):
    """A trainable student and its distillation heads, beside a frozen teacher.

    ``heads`` maps ``"feature"`` and/or ``"logit"`` to a head module (``head(student, teacher) -> dict`` with
    ``loss``).  A feature head needs the names of the modules whose outputs are the feature maps
    (``student_feature`` / ``teacher_feature``, as found by :func:`diffkd.models.default_taps`); they are read
    with forward hooks.  Token outputs (B×N×C) become maps; the larger of two maps of different sizes is
    average-pooled to the smaller size.

    ``forward(images, targets)`` returns ``loss`` (to optimise), ``logits`` (the student's), ``ce_loss`` and
    ``<head>/<term>`` for every scalar term of every head (per-sample terms such as ``gamma`` as batch means).
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, heads: Mapping[str, nn.Module] | None = None,
                 *, teacher_feature: str | None = None, student_feature: str | None = None, ce_weight: float = 1.0):
        super().__init__()
        heads = dict(heads or {})
        unknown = sorted(set(heads) - set(HEAD_KINDS))
        if unknown:
            raise ValueError(f"unknown head names {unknown}; heads are keyed by what they distil: "
                             f"{' or '.join(HEAD_KINDS)}")
        if heads and teacher is None:
            raise ValueError(f"heads {sorted(heads)} need a teacher, got teacher=None")
        if "feature" in heads and not (teacher_feature and student_feature):
            raise ValueError("a feature head needs teacher_feature and student_feature (module names whose outputs "
                             f"are the feature maps), got {teacher_feature!r} and {student_feature!r}")
        self.student = student
        self.heads = nn.ModuleDict(heads)
        self.ce_weight = ce_weight
        self.student_feature, self.teacher_feature = student_feature, teacher_feature
        # Not a submodule on purpose: state_dict, parameters(), the optimizer and DDP must never see the teacher.
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        uses_features = "feature" in heads
        self._student_taps = FeatureTaps(student, student_feature) if uses_features else None
        self._teacher_taps = FeatureTaps(teacher, teacher_feature) if uses_features else None

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

    def extra_parameter_count(self) -> int:
        """Parameters that exist only for training (the heads); the deployed student does not carry them."""
        return sum(p.numel() for p in self.heads.parameters())

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = teacher_map = None
        if self.heads:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
                if self._teacher_taps is not None:
                    teacher_map = self._teacher_taps.feature
                    self._teacher_taps.clear()
        student_logits = self.student(images)
        ce_loss = F.cross_entropy(student_logits.float(), targets)
        out = {"logits": student_logits, "ce_loss": ce_loss.detach()}
        loss = self.ce_weight * ce_loss
        for name, head in self.heads.items():
            if name == "feature":
                student_map, pooled_teacher_map = match_spatial(self._student_taps.feature, teacher_map)
                self._student_taps.clear()
                terms = head(student_map, pooled_teacher_map)
            else:
                terms = head(student_logits, teacher_logits)
            loss = loss + terms["loss"]
            for term, value in terms.items():
                if term not in _UNLOGGED_TERMS:
                    out[f"{name}/{term}"] = value.detach().float().mean()
        out["loss"] = loss
        return out


def build_heads(settings: MethodSettings, student_shapes: Mapping[str, tuple[int, ...]],
                teacher_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, nn.Module]:
    """The heads of ``settings.method`` for the given feature/logit shapes (without batch dimension)."""
    heads: dict[str, nn.Module] = {}
    for kind in settings.head_kinds:
        s_channels, t_channels = student_shapes[kind][0], teacher_shapes[kind][0]
        if kind == "logit" and s_channels != t_channels:
            raise ValueError(f"the student predicts {s_channels} classes and the teacher {t_channels}: logit "
                             "distillation needs the same classes (build both models with the same num_classes)")
        if settings.method in ("kd", "dist"):
            heads[kind] = LogitDistillation("kl" if settings.method == "kd" else "dist", weight=settings.kd_weight,
                                            temperature=settings.kd_temperature, beta=settings.dist_beta,
                                            gamma=settings.dist_gamma)
        elif settings.method == "mse":
            heads[kind] = FeatureRegression(s_channels, t_channels, weight=settings.kd_weight)
        else:
            is_feature = kind == "feature"
            use_ae = is_feature and settings.ae_channels > 0
            heads[kind] = DiffKDHead(
                s_channels, t_channels, kernel_size=3 if is_feature else 1, use_ae=use_ae,
                ae_channels=settings.ae_channels if use_ae else None, inference_steps=settings.nfe,
                timestep_start=settings.timestep_start, use_anm=settings.anm,
                distance="mse" if is_feature else settings.logit_distance, temperature=settings.kd_temperature,
                kd_weight=settings.kd_weight, diffusion_weight=settings.diffusion_weight,
                ae_weight=settings.ae_weight, backend=settings.backend)
    return heads


def _tap_shapes(model: nn.Module, taps: tuple[str, str], input_size: tuple[int, int, int]) -> dict[str, tuple]:
    """Shapes (batch 1) of the model's feature map and logits, from one dry forward pass."""
    feature_tap, logits_tap = taps
    shapes = probe_taps(model, [feature_tap, logits_tap], input_size)
    return {"feature": shapes[feature_tap], "logit": shapes[logits_tap]}


def build_distiller(settings: MethodSettings, student: nn.Module, teacher: nn.Module | None = None, *,
                    student_taps: tuple[str, str] | None = None, teacher_taps: tuple[str, str] | None = None,
                    input_size: tuple[int, int, int], log: Callable[[str], None] = print) -> Distiller:
    """A Distiller for ``settings``; channels and sizes come from one dry forward pass of each model.

    ``*_taps`` are (feature module, logits module) names, e.g. from :func:`diffkd.models.default_taps`;
    ``input_size`` is C×H×W of one image.  ``log`` receives one line per start-up fact worth knowing (the
    tapped shapes, pooling of a larger student map).
    """
    kinds = settings.head_kinds
    if not kinds:
        return Distiller(None, student, ce_weight=settings.ce_weight)
    if teacher is None:
        raise ValueError(f"method {settings.method!r} needs a teacher; pass --teacher (or use --method none)")
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
        log(f"logit head: {student_shapes['logit'][1]} classes")
    heads = build_heads(settings, {k: v[1:] for k, v in student_shapes.items()},
                        {k: v[1:] for k, v in teacher_shapes.items()})
    return Distiller(teacher, student, heads, teacher_feature=teacher_taps[0], student_feature=student_taps[0],
                     ce_weight=settings.ce_weight)


def _format_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)
