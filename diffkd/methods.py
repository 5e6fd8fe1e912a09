"""Distillation methods: their settings and loss-weight defaults per recipe and task, and the heads they put on
a (student, teacher) pair of tensors.

:func:`method_settings` gives a method's settings for a dataset and task (the paper's loss weights where it has
them, tagged below); :func:`build_heads` makes a classifier's heads; :func:`logit_head`, :func:`diffkd_head` and
:func:`feature_map_head` make one head each, for the Distillers of :mod:`diffkd.distill` to bind to taps.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from diffkd.compression import COMPRESSIONS
from diffkd.losses import FEATURE_DISTANCES, dist_loss, kl_div_loss, mse_loss
from diffkd.modules import FEATURE_NORMS, DiffKDHead, standardize_channels

METHODS = ("none", "kd", "dist", "mse", "diffkd")
TASKS = ("classification", "detection", "segmentation")
# kd and dist compare class probabilities, which FPN maps are not; mse on class scores is no method of the papers.
TASK_METHODS = {"classification": METHODS, "detection": ("none", "mse", "diffkd"),
                "segmentation": ("none", "kd", "dist", "diffkd")}
HEAD_KINDS = ("feature", "logit")
HEAD_SELECTIONS = {"feature": ("feature",), "logit": ("logit",), "both": ("feature", "logit")}
LOGIT_DISTANCES = ("kl", "dist")


@dataclass(frozen=True)
class MethodSettings:
    """Everything that defines a distillation method's losses; ``method_settings`` fills the recipe defaults."""

    method: str = "diffkd"
    ce_weight: float = 1.0          # the task loss: CE (classification, segmentation) or the detector's losses
    kd_weight: float = 1.0          # the KD/DIST/MSE term, or each DiffKD head's KD term
    kd_temperature: float = 1.0     # τ of KL and DIST (DiffKD's logit head included)
    dist_beta: float = 1.0          # DIST inter-class weight
    dist_gamma: float = 1.0         # DIST intra-class weight
    diffusion_weight: float = 1.0   # DiffKD: the denoiser's diffusion loss
    ae_weight: float = 1.0          # DiffKD: the feature head's autoencoder loss
    heads: str = "both"             # DiffKD on classification: feature | logit | both
    ae_channels: int = 0            # DiffKD feature head's autoencoder width; 0 = no autoencoder
    compression: str | None = None  # DiffKD feature head: ae | pca | random (ae_channels wide) | none; None: ae when
    #                                 ae_channels > 0, else none
    feature_distance: str = "mse"   # DiffKD feature head's KD distance: mse | cosine | pearson
    logit_kd_weight: float = 0.0    # DiffKD with heads "feature": plain KD (KL) on the logits beside it; 0 = none
    logit_kd_temperature: float = 4.0  # its τ (the KD recipe's)
    nfe: int = 5                    # DiffKD: denoising steps
    anm: bool = True                # DiffKD: adaptive noise matching
    logit_distance: str = "kl"      # DiffKD's logit / score-map head: kl, or dist (the paper's DiffKD†)
    timestep_start: str = "official"
    backend: str = "auto"
    feature_norm: str = "none"      # mse / DiffKD feature heads: "channel" standardises both maps before the distance

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.heads not in HEAD_SELECTIONS:
            raise ValueError(f"unknown heads {self.heads!r}; choose one of {', '.join(HEAD_SELECTIONS)}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature norm {self.feature_norm!r}; choose one of {', '.join(FEATURE_NORMS)}")
        if self.logit_distance not in LOGIT_DISTANCES:
            raise ValueError(f"unknown logit distance {self.logit_distance!r}; choose one of "
                             f"{', '.join(LOGIT_DISTANCES)}")
        if not isinstance(self.ae_channels, int) or self.ae_channels < 0:
            raise ValueError(f"ae_channels must be an integer >= 0 (0 = no autoencoder), got {self.ae_channels!r}")
        if self.compression is None:  # frozen: resolve the default in place
            object.__setattr__(self, "compression", "ae" if self.ae_channels > 0 else "none")
        if self.compression not in (*COMPRESSIONS, "none"):
            raise ValueError(f"unknown compression {self.compression!r}; choose one of {', '.join(COMPRESSIONS)}, none")
        if (self.compression == "none") != (self.ae_channels == 0):
            raise ValueError(f"compression {self.compression} needs " + (
                "ae_channels 0 (no latent)" if self.compression == "none" else
                "ae_channels > 0, the latent width (--ae-channels N)") + f", got ae_channels {self.ae_channels}")
        if not self.logit_kd_weight >= 0 or not self.logit_kd_temperature > 0:
            raise ValueError(f"logit_kd_weight must be >= 0 and logit_kd_temperature > 0, got "
                             f"{self.logit_kd_weight!r} and {self.logit_kd_temperature!r}")
        if self.logit_kd_weight > 0 and (self.method != "diffkd" or self.heads != "feature"):
            raise ValueError("logit KD beside DiffKD (logit_kd_weight > 0) takes the logit slot: it needs method "
                             f"diffkd with heads feature (--heads feature), got method {self.method}, heads "
                             f"{self.heads}")
        if self.feature_distance not in FEATURE_DISTANCES:
            raise ValueError(f"unknown feature distance {self.feature_distance!r}; choose one of "
                             f"{', '.join(FEATURE_DISTANCES)}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature!r}")
        for name in ("ce_weight", "kd_weight", "diffusion_weight", "ae_weight", "dist_beta", "dist_gamma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def head_kinds(self) -> tuple[str, ...]:
        """The tensors this method distils on a classifier (empty: the method needs no teacher)."""
        return {"none": (), "kd": ("logit",), "dist": ("logit",), "mse": ("feature",),
                "diffkd": HEAD_SELECTIONS[self.heads] + (("logit",) if self.logit_kd_weight > 0 else ())}[self.method]


# Loss weights per method and recipe column.  Tags: [paper] the DiffKD paper, [benchmark] the common CIFAR
# benchmark's convention, [DIST] the segmentation code of DIST (Huang et al., NeurIPS 2022), [CIRKD] the
# pixel-wise KD baseline of CIRKD (Yang et al., CVPR 2022), [ours] our choice where none says.
# The CIFAR-100 column also serves Fashion-MNIST (small images, small models).
_RECIPE_COLUMN = {"cifar100": "cifar", "fashion-mnist": "cifar", "imagenet": "imagenet"}
# Datasets with dense targets, and the tasks they serve (the column is the task).
_DENSE_DATASETS = {"fashion-scenes": ("detection", "segmentation"), "coco": ("detection",),
                   "segfolder": ("segmentation",)}
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
    # Detection: every FPN level, no autoencoder, diffusion weight 1 [paper]; the FitNet-style mse baseline on the
    # same levels. Both standardise each channel before the distance, with KD weight 1 [ours, measured]: the paper's
    # weight 5 on raw FPN maps makes the KD terms ~300x the detector loss (a trained teacher's maps have mean
    # squares up to ~100), as mmrazor's PKD found; channel norm + weight 1 puts every DiffKD term together at ~9x
    # in epoch 1 (configs/detection/demo.yaml says how this was measured). --feature-norm none --kd-weight 5 is the
    # paper's literal setting.
    ("none", "detection"): dict(ce_weight=1.0),
    ("mse", "detection"): dict(ce_weight=1.0, kd_weight=1.0, feature_norm="channel"),
    ("diffkd", "detection"): dict(ce_weight=1.0, kd_weight=1.0, diffusion_weight=1.0, ae_weight=1.0,
                                  kd_temperature=1.0, ae_channels=0, feature_norm="channel"),
    # Segmentation, on the class-score map: pixel-wise KL with τ = 1 and weight 1 [CIRKD]; DIST with τ = 1,
    # β = γ = 1, λ = 1 [DIST]; DiffKD with the DIST distance, λ = 1, no autoencoder [paper].
    ("none", "segmentation"): dict(ce_weight=1.0),
    ("kd", "segmentation"): dict(ce_weight=1.0, kd_weight=1.0, kd_temperature=1.0),
    ("dist", "segmentation"): dict(ce_weight=1.0, kd_weight=1.0, kd_temperature=1.0, dist_beta=1.0, dist_gamma=1.0),
    ("diffkd", "segmentation"): dict(ce_weight=1.0, kd_weight=1.0, diffusion_weight=1.0, ae_weight=1.0,
                                     kd_temperature=1.0, ae_channels=0, logit_distance="dist"),
}
SETTING_NAMES = tuple(f.name for f in fields(MethodSettings))


def _recipe_column(method: str, dataset: str, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if method not in TASK_METHODS[task]:
        raise ValueError(f"method {method!r} does not apply to {task}; choose one of {', '.join(TASK_METHODS[task])}")
    if task == "classification":
        if dataset not in _RECIPE_COLUMN:
            dense = f" ({dataset!r} is a {' / '.join(_DENSE_DATASETS[dataset])} dataset)" \
                if dataset in _DENSE_DATASETS else ""
            raise ValueError(f"unknown dataset {dataset!r} for classification{dense}; choose one of "
                             f"{', '.join(_RECIPE_COLUMN)}")
        return _RECIPE_COLUMN[dataset]
    if task not in _DENSE_DATASETS.get(dataset, ()):
        choices = [name for name, tasks in _DENSE_DATASETS.items() if task in tasks]
        raise ValueError(f"dataset {dataset!r} has no {task} targets; choose one of {', '.join(choices)}")
    return task


def method_settings(method: str, dataset: str, task: str = "classification", **overrides) -> MethodSettings:
    """The method's settings for ``dataset`` and ``task`` (the recipe's defaults), with ``overrides`` (None values
    ignored).  Detection and segmentation have their own defaults (see ``_METHOD_DEFAULTS``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    column = _recipe_column(method, dataset, task)
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown method settings {unknown}; expected some of {', '.join(SETTING_NAMES)}")
    values = dict(_METHOD_DEFAULTS[method, column])
    values.update({name: value for name, value in overrides.items() if value is not None})
    if values.get("compression") == "none" and overrides.get("ae_channels") is None:
        values["ae_channels"] = 0  # "none" turns the recipe's autoencoder off
    values["method"] = method
    return MethodSettings(**values)


# ---- heads -----------------------------------------------------------------------------------------------------
class LogitDistillation(nn.Module):
    """KL (τ²·KL, batchmean) or DIST between the student's and the teacher's logits.

    On B×K×H×W class-score maps both work per pixel: softmax over the K classes of each pixel; KL is averaged
    over pixels, DIST's inter-class term correlates each pixel's class distributions and its intra-class term each
    class's scores over all pixels of the batch (as the DIST paper's segmentation code does).
    """

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
    """The ``mse`` baseline: a 1×1 conv (student → teacher channels) + BatchNorm, then MSE to the teacher map.

    ``feature_norm="channel"`` standardises each channel of both maps first (mmrazor's PKD), so that the term does
    not scale with the teacher's raw activations."""

    def __init__(self, student_channels: int, teacher_channels: int, *, weight: float = 1.0,
                 feature_norm: str = "none"):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature_norm {feature_norm!r}; expected one of {', '.join(FEATURE_NORMS)}")
        self.weight, self.feature_norm = weight, feature_norm
        self.proj = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, kernel_size=1),
                                  nn.BatchNorm2d(teacher_channels))

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> dict[str, torch.Tensor]:
        projected = self.proj(student_map)
        if self.feature_norm == "channel":
            projected, teacher_map = standardize_channels(projected), standardize_channels(teacher_map)
        kd_loss = mse_loss(projected, teacher_map)
        return {"loss": self.weight * kd_loss, "kd_loss": kd_loss}


def logit_head(settings: MethodSettings) -> LogitDistillation:
    """The kd / dist method's head."""
    return LogitDistillation("kl" if settings.method == "kd" else "dist", weight=settings.kd_weight,
                             temperature=settings.kd_temperature, beta=settings.dist_beta, gamma=settings.dist_gamma)


SPATIAL_HEAD_MIN_WIDTH = 8  # the 3×3 noise adapter's bottleneck divides the working width by 8


def diffkd_head_kernel_size(settings: MethodSettings, teacher_channels: int, *, spatial: bool,
                            autoencoder: bool) -> int:
    """3 for a spatial head, except where its working width (the teacher's channels, or the autoencoder's) is under
    8, e.g. the score map of a model of fewer than 8 classes: 1, the paper's logit variant, which works on any
    width and still denoises every position of the map."""
    width = settings.ae_channels if autoencoder and settings.ae_channels > 0 else teacher_channels
    return 3 if spatial and width >= SPATIAL_HEAD_MIN_WIDTH else 1


def diffkd_head(settings: MethodSettings, student_channels: int, teacher_channels: int, *, spatial: bool,
                 distance: str, autoencoder: bool, feature_norm: str = "none") -> DiffKDHead:
    use_ae = autoencoder and settings.ae_channels > 0
    kernel_size = diffkd_head_kernel_size(settings, teacher_channels, spatial=spatial, autoencoder=autoencoder)
    return DiffKDHead(student_channels, teacher_channels, kernel_size=kernel_size, use_ae=use_ae,
                      ae_channels=settings.ae_channels if use_ae else None,
                      compression=settings.compression if use_ae else "ae", inference_steps=settings.nfe,
                      timestep_start=settings.timestep_start, use_anm=settings.anm, distance=distance,
                      temperature=settings.kd_temperature, kd_weight=settings.kd_weight,
                      diffusion_weight=settings.diffusion_weight, ae_weight=settings.ae_weight,
                      backend=settings.backend, feature_norm=feature_norm)


def feature_map_head(settings: MethodSettings, student_channels: int, teacher_channels: int) -> nn.Module:
    """The mse / diffkd head on a pair of feature maps (classification features, FPN levels), with the settings'
    feature normalisation."""
    if settings.method == "mse":
        return FeatureRegression(student_channels, teacher_channels, weight=settings.kd_weight,
                                 feature_norm=settings.feature_norm)
    return diffkd_head(settings, student_channels, teacher_channels, spatial=True,
                       distance=settings.feature_distance, autoencoder=True, feature_norm=settings.feature_norm)


def build_heads(settings: MethodSettings, student_shapes: Mapping[str, tuple[int, ...]],
                teacher_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, nn.Module]:
    """A classifier's heads for ``settings.method``, given its feature/logit shapes (without batch dimension)."""
    heads: dict[str, nn.Module] = {}
    for kind in settings.head_kinds:
        s_channels, t_channels = student_shapes[kind][0], teacher_shapes[kind][0]
        if kind == "logit" and s_channels != t_channels:
            raise ValueError(f"the student predicts {s_channels} classes and the teacher {t_channels}: logit "
                             "distillation needs the same classes (build both models with the same num_classes)")
        if settings.method in ("kd", "dist"):
            heads[kind] = logit_head(settings)
        elif kind == "logit" and settings.logit_kd_weight > 0:  # plain KD beside DiffKD's feature head
            heads[kind] = LogitDistillation("kl", weight=settings.logit_kd_weight,
                                            temperature=settings.logit_kd_temperature)
        elif kind == "feature":
            heads[kind] = feature_map_head(settings, s_channels, t_channels)
        else:
            heads[kind] = diffkd_head(settings, s_channels, t_channels, spatial=False,
                                       distance=settings.logit_distance, autoencoder=False)
    return heads
