"""How much of the teacher's feature does the student's feature not explain?  The paper's premise, measured.

DiffKD (Huang et al., "Knowledge Diffusion for Distillation", NeurIPS 2023) models the student's feature as a
noisy version of the teacher's and denoises it before distilling; its summary argues that this matters more as
the capacity gap between teacher and student grows.  Nothing in a trained run says how noisy the student's feature
is: γ, the noise adapter's blend weight, is a learned training knob (γ ≈ 1 only says that no noise is added), and
the head's "error before denoising" is mostly its projection's.  This module estimates the gap directly, for any
(student, teacher) pair, on features sampled per spatial position (a B×C×H×W map gives B·H·W vectors of C
channels; logits give B vectors):

1. Linear predictability (ridge).  A map W (with intercept) is fitted on training images by ridge regression,
   Z_t ≈ W·Z_s, with penalty ``alpha`` · tr(Cov Z_s) / dim Z_s, and scored on test images:
   SNR = Σ‖W·(Z_s − μ_s)‖² / Σ‖Z_t − W·Z_s − b‖²  (explained energy over residual energy; μ_s the fit's mean) and
   1 − R² = Σ‖Z_t − W·Z_s − b‖² / Σ‖Z_t − mean Z_t‖²  (the fraction of the teacher's variance left unexplained).
   Both directions: student → teacher (what the student misses of the teacher: the paper's "noise") and
   teacher → student (what the student has that the teacher does not explain).  If Z_s = A·Z_t + N with noise N
   independent of Z_t, teacher → student recovers the noise energy: its residual is N, its SNR is
   ‖A·Z_t‖²/‖N‖² (tested in tests/test_noise_gap.py).
   Can show: how far the best linear read-out of one feature is from the other, on held-out images.  Cannot
   show: noise in the paper's generative sense (a non-linear but exact relation counts as noise here), and it
   is blind to what a non-linear denoiser could recover.
2. Linear CKA (Kornblith et al., 2019) between Z_s and Z_t on the test images: ‖C_st‖²_F / (‖C_ss‖_F ‖C_tt‖_F)
   of the centred cross- and auto-covariances, 1 for features equal up to rotation and isotropic scale.  It
   fits no map (nothing is learned from the data), so it does not assume that one linear read-out exists, but it
   is not invariant to arbitrary invertible linear maps: a student that holds the teacher's information in
   rescaled channels scores below 1.  For Z_s = Z_t + σ·N with white Z_t and N, CKA = 1 / (1 + σ²).

3. Seed-to-seed agreement: the same two estimates between the students of two runs (:func:`measure_runs`;
   ``--noise-gap-against OTHER/last.pth``), e.g. two seeds of one recipe.  What two students of one architecture,
   trained alike, do not explain of each other is specific to the seed, not missing capacity: the reference level
   against which a student → teacher gap can be read.  It needs no teacher and assumes nothing of it.  Cannot
   show: which part of the student → teacher gap is the teacher's own seed-specific part (that needs two teachers).

For a DiffKD run the same estimates are taken per head at three points, so that the chain's own share is
visible: ``raw`` (the backbone's feature against the teacher's, or the logits), ``projection`` (proj(trans(Z_s)):
the head's learned maps alone, no noise and no denoising: chain step 0) and ``denoised`` (proj of the trained
chain's output from the noise-matched input, with fixed noises as in :mod:`diffkd.diagnose`), each against the
head's target (the teacher feature, or its autoencoder latent).  Everything runs in eval mode without gradient.

``python -m diffkd.eval RUN/last.pth --noise-gap`` prints the table for a run (``--noise-gap-against OTHER.pth``:
against another run's student); :func:`measure_checkpoint` and :func:`measure_runs` are the library calls.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from diffkd.diagnose import chain_start, diffkd_heads, fixed_blend_noise, rebuild_run
from diffkd.models import FeatureLogitTaps, create_model, default_taps, match_spatial

RIDGE_ALPHA = 1e-3  # the ridge penalty, relative to the mean variance of the predictor's dimensions
FIT_IMAGES, TEST_IMAGES = 10_000, 10_000


def feature_rows(x: torch.Tensor) -> torch.Tensor:
    """Samples of a feature as rows, in float64: B×C×H×W → (B·H·W)×C, B×K stays."""
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    elif x.dim() != 2:
        raise ValueError(f"expected a B×C×H×W feature map or B×K vectors, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64)


class Moments:
    """Running sums of a pair of sample matrices X (n×dx) and Y (n×dy): n, ΣX, ΣY, XᵀX, YᵀY, XᵀY (float64)."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.xx = self.yy = self.xy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = feature_rows(x).cpu(), feature_rows(y).cpu()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"the two features give {x.shape[0]} and {y.shape[0]} samples; they must be paired "
                             f"(same batch, same spatial size)")
        sums = (x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)
        if self.n == 0:
            self.sx, self.sy, self.xx, self.yy, self.xy = sums
        else:
            self.sx, self.sy, self.xx, self.yy, self.xy = (a + b for a, b in zip(
                (self.sx, self.sy, self.xx, self.yy, self.xy), sums))
        self.n += x.shape[0]

    def swapped(self) -> "Moments":
        """The moments of (Y, X)."""
        other = Moments()
        other.n, other.sx, other.sy, other.xx, other.yy, other.xy = self.n, self.sy, self.sx, self.yy, self.xx, \
            self.xy.T
        return other

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C_xx, C_yy, C_xy): the sums of centred products."""
        mx, my = self.sx / self.n, self.sy / self.n
        return (self.xx - self.n * torch.outer(mx, mx), self.yy - self.n * torch.outer(my, my),
                self.xy - self.n * torch.outer(mx, my))


@dataclass(frozen=True)
class LinearGap:
    """A ridge read-out scored on test samples: SNR (explained / residual energy) and 1 − R²."""
    snr: float
    one_minus_r2: float

    @property
    def noise_to_signal(self) -> float:
        return 1 / self.snr if self.snr > 0 else math.inf


@dataclass(frozen=True)
class PairGap:
    """Both ridge directions and linear CKA for one (student, teacher) feature pair."""
    student_to_teacher: LinearGap
    teacher_to_student: LinearGap
    cka: float
    fit_samples: int
    test_samples: int


def ridge_map(fit: Moments, alpha: float = RIDGE_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising Σ‖y − xW − b‖² + λ‖W‖², λ = alpha · tr(C_xx) / dx (so alpha is scale-free)."""
    if fit.n < 2:
        raise ValueError(f"fitting a map needs at least 2 samples, got {fit.n}")
    c_xx, _, c_xy = fit.centred()
    penalty = alpha * float(torch.trace(c_xx)) / c_xx.shape[0]
    eye = torch.eye(c_xx.shape[0], dtype=c_xx.dtype)
    w = torch.linalg.solve(c_xx + max(penalty, 1e-12) * eye, c_xy)
    b = fit.sy / fit.n - (fit.sx / fit.n) @ w
    return w, b


def score_map(w: torch.Tensor, b: torch.Tensor, fit_mean_x: torch.Tensor, test: Moments) -> LinearGap:
    """SNR and 1 − R² of the read-out ŷ = xW + b on the test moments (closed forms of the sums over samples)."""
    n, sx, sy = test.n, test.sx, test.sy
    predicted_energy = torch.sum(w * (test.xx @ w)) + 2 * b @ (sx @ w) + n * b @ b  # Σ‖ŷ‖²
    residual = torch.trace(test.yy) - 2 * (torch.sum(w * test.xy) + b @ sy) + predicted_energy
    variance = torch.trace(test.yy) - sy @ sy / n                           # Σ‖y − ȳ‖²
    # Σ‖(x − μ)W‖² with μ the fit's mean: the explained part, without the intercept.
    shifted = test.xx - torch.outer(sx, fit_mean_x) - torch.outer(fit_mean_x, sx) + n * torch.outer(fit_mean_x,
                                                                                                       fit_mean_x)
    signal = torch.sum(w * (shifted @ w))
    residual, variance, signal = float(residual), float(variance), float(signal)
    return LinearGap(snr=signal / residual if residual > 0 else math.inf,
                     one_minus_r2=residual / variance if variance > 0 else math.nan)


def linear_cka(test: Moments) -> float:
    """Linear CKA of X and Y: ‖C_xy‖²_F / (‖C_xx‖_F · ‖C_yy‖_F)."""
    c_xx, c_yy, c_xy = test.centred()
    denominator = float(torch.linalg.norm(c_xx) * torch.linalg.norm(c_yy))
    return float(torch.linalg.norm(c_xy) ** 2) / denominator if denominator > 0 else math.nan


def pair_gap(fit: Moments, test: Moments, alpha: float = RIDGE_ALPHA) -> PairGap:
    """Both ridge directions (fitted on ``fit``, scored on ``test``) and CKA on ``test``; X is the student."""
    directions = []
    for fit_m, test_m in ((fit, test), (fit.swapped(), test.swapped())):
        w, b = ridge_map(fit_m, alpha)
        directions.append(score_map(w, b, fit_m.sx / fit_m.n, test_m))
    return PairGap(*directions, cka=linear_cka(test), fit_samples=fit.n, test_samples=test.n)


def features_gap(fit_pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 test_pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], alpha: float = RIDGE_ALPHA) -> PairGap:
    """:func:`pair_gap` of (student, teacher) feature batches given directly."""
    fit, test = Moments(), Moments()
    for moments, pairs in ((fit, fit_pairs), (test, test_pairs)):
        for z_s, z_t in pairs:
            moments.add(z_s, z_t)
    return pair_gap(fit, test, alpha)


# ---------------------------------------------------------------------------------------------------------------
# Trained models
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _accumulate(student: nn.Module, teacher: nn.Module, taps: Mapping[str, FeatureLogitTaps],
                heads: Mapping[str, nn.Module], batches: Iterable, device, seed: int) -> dict[str, Moments]:
    """Moments of every measured (student, teacher) pair over ``batches`` of (images, ...)."""
    moments: dict[str, Moments] = {}

    def add(name: str, z_s: torch.Tensor, z_t: torch.Tensor) -> None:
        moments.setdefault(name, Moments()).add(z_s, z_t)

    for batch_index, (images, *_) in enumerate(batches):
        images = images.to(device)
        pairs = {"logit": (student(images), teacher(images))}
        pairs["feature"] = match_spatial(taps["student"].feature, taps["teacher"].feature)
        for tap in taps.values():
            tap.clear()
        for name, pair in pairs.items():
            add(f"{name}/raw", *pair)
        for name, head in heads.items():
            z_s, z_t, _, x_start = chain_start(head, *pairs[name],
                                               lambda shape: fixed_blend_noise(shape, seed, batch_index))
            add(f"{name}/projection", head.proj(z_s), z_t)
            add(f"{name}/denoised", head.proj(head.denoise(x_start)), z_t)
    return moments


def measure_models(student: nn.Module, teacher: nn.Module, fit_batches: Iterable, test_batches: Iterable, *,
                   feature_taps: tuple[str, str], heads: Mapping[str, nn.Module] | None = None, seed: int = 0,
                   device: torch.device | str = "cpu", alpha: float = RIDGE_ALPHA) -> dict[str, PairGap]:
    """The noise gap of every measured point: "feature/raw" and "logit/raw" (the backbones' features and
    logits), and per DiffKD head in ``heads`` "<head>/projection" and "<head>/denoised".  ``feature_taps`` =
    (student module, teacher module) whose outputs are the feature maps.  Models and heads are left in eval mode."""
    heads = diffkd_heads(heads) if heads else {}
    for module in (student, teacher, *heads.values()):
        module.eval().to(device)
    taps = {role: FeatureLogitTaps(model, tap) for role, model, tap in (("student", student, feature_taps[0]),
                                                                        ("teacher", teacher, feature_taps[1]))}
    try:
        fit = _accumulate(student, teacher, taps, heads, fit_batches, device, seed)
        test = _accumulate(student, teacher, taps, heads, test_batches, device, seed + 1_000_003)
    finally:
        for tap in taps.values():
            tap.remove()
    if not fit or not test:
        raise ValueError("the noise gap needs images to fit on and images to test on: a loader gave no batch")
    return {name: pair_gap(fit[name], test[name], alpha) for name in fit}


def _model(name: str, info: Mapping, **kwargs) -> tuple[nn.Module, str]:
    """A model and its default feature tap."""
    model = create_model(name, num_classes=info["num_classes"], in_chans=info["in_chans"], **kwargs)
    return model, default_taps(name, model, (info["in_chans"], info["image_size"], info["image_size"]))[0]


def _student(checkpoint: Mapping, info: Mapping) -> tuple[nn.Module, str]:
    """A training checkpoint's student with its weights, and the module whose output is its feature map."""
    run_args = checkpoint["args"]
    student, tap = _model(run_args["student"], info)
    student.load_state_dict(checkpoint["student"])
    return student, run_args.get("student_feature") or tap


def measure_runs(checkpoint: Mapping, other: Mapping, fit_batches: Iterable, test_batches: Iterable, info: Mapping,
                 *, device: torch.device | str = "cpu") -> dict[str, PairGap]:
    """The students of two ``diffkd.train`` checkpoints measured against each other ("feature/raw" and
    "logit/raw"; ``other``'s student in the teacher's place): the seed-to-seed agreement of the module docstring."""
    (student, student_tap), (reference, reference_tap) = _student(checkpoint, info), _student(other, info)
    return measure_models(student, reference, fit_batches, test_batches, feature_taps=(student_tap, reference_tap),
                          device=device)


def measure_checkpoint(checkpoint: Mapping, fit_batches: Iterable, test_batches: Iterable, info: Mapping, *,
                       teacher: tuple[str, str | Path] | None = None, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, PairGap]:
    """:func:`measure_models` for a ``diffkd.train`` checkpoint: its student against its teacher (a DiffKD run
    with its heads), or against ``teacher`` = (model name, weight file), e.g. for a run trained without one."""
    run_args = checkpoint["args"]
    if teacher is None and run_args.get("method") == "diffkd":
        run = rebuild_run(run_args, checkpoint["student"], checkpoint["heads"], info)
        return measure_models(run.student, run.teacher, fit_batches, test_batches, feature_taps=run.feature_taps,
                              heads=run.heads, seed=seed, device=device)
    name, weights = teacher or (run_args.get("teacher"), run_args.get("teacher_ckpt"))
    if not name:
        raise ValueError(f"this run (--method {run_args.get('method')}) has no teacher: name one to measure against "
                         f"(teacher=(model, weight file))")
    if weights and not Path(weights).is_file():
        raise ValueError(f"the teacher's weight file {weights} does not exist")
    student, student_tap = _student(checkpoint, info)
    teacher_model, teacher_tap = _model(name, info, checkpoint=weights,
                                        pretrained=not weights and bool(run_args.get("teacher_pretrained")))
    taps = (student_tap, (run_args.get("teacher_feature") if teacher is None else None) or teacher_tap)
    return measure_models(student, teacher_model, fit_batches, test_batches, feature_taps=taps, seed=seed,
                          device=device)


def measurement_batches(dataset: str, data_dir: str | None, *, fit_images: int = FIT_IMAGES,
                        test_images: int = TEST_IMAGES, batch_size: int = 256) -> tuple[list, list, dict]:
    """(fit batches, test batches, info): ``fit_images`` training images without augmentation (a fixed
    class-balanced subset) and the first ``test_images`` test images, in batches of (images, labels)."""
    from diffkd.data import build_datasets, subset

    train_ds, test_ds, info = build_datasets(dataset, data_dir, train_transform=False)
    fit_ds = subset(train_ds, min(fit_images, len(train_ds)), seed=0)
    test_ds = subset(test_ds, min(test_images, len(test_ds)), seed=0) if test_images < len(test_ds) else test_ds
    loaders = [torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False) for ds in (fit_ds, test_ds)]
    return list(loaders[0]), list(loaders[1]), info


def as_dict(gaps: Mapping[str, PairGap]) -> dict[str, dict]:
    return {name: asdict(gap) for name, gap in gaps.items()}


def format_table(gaps: Mapping[str, PairGap], reference: str = "the teacher's") -> str:
    """One row per measured point: both ridge directions (SNR, 1 − R²) and CKA; t is ``reference``."""
    lines = [f"{'point':<20} {'s→t SNR':>9} {'s→t 1−R²':>9} {'t→s SNR':>9} {'t→s 1−R²':>9} {'CKA':>6} "
             f"{'fit / test samples':>20}"]
    for name, gap in gaps.items():
        s2t, t2s = gap.student_to_teacher, gap.teacher_to_student
        lines.append(f"{name:<20} {s2t.snr:>9.3f} {s2t.one_minus_r2:>9.3f} {t2s.snr:>9.3f} {t2s.one_minus_r2:>9.3f} "
                     f"{gap.cka:>6.3f} {f'{gap.fit_samples} / {gap.test_samples}':>20}")
    lines.append(f"(s→t: the student's feature read out linearly as {reference}; samples: one per image and "
                 f"spatial position)")
    return "\n".join(lines)


def checkpoint_report(checkpoint: Mapping | None, *, dataset: str, data_dir: str | None, task: str,
                      device: torch.device | str = "cpu", against: Mapping | None = None) -> str:
    """The table ``python -m diffkd.eval RUN/last.pth --noise-gap`` prints: the run's student against its
    teacher, or against the student of the run ``against`` (a training checkpoint), fitted on the first
    FIT_IMAGES training images and scored on the test images."""
    if checkpoint is None:
        raise ValueError("it needs the last.pth / best.pth of a diffkd run (its settings name the teacher)")
    if task != "classification":
        raise ValueError(f"it measures classifiers' features and logits; this run is {task}")
    if against is not None and against["args"].get("dataset") != dataset:
        raise ValueError(f"the other run was trained on {against['args'].get('dataset')}, this one is tested on "
                         f"{dataset}: compare runs of one dataset")
    fit, test, info = measurement_batches(dataset, data_dir)
    if against is None:
        return format_table(measure_checkpoint(checkpoint, fit, test, info, device=device))
    return format_table(measure_runs(checkpoint, against, fit, test, info, device=device),
                        reference="the other run's student's")
