"""Where does a trained DiffKD head denoise?  The paper's NFE ablation, run on your own model.

DiffKD (Huang et al., NeurIPS 2023) blends the student feature with noise (γ·Z_s + (1−γ)·ε), denoises it in a
few DDIM steps of the trained denoiser Φ, and distils the result to the teacher feature Z_t.  For a trained
run this module measures, on the test set, for every DiffKD head:

- the KD distance of the denoised student feature to the teacher as a function of the number of denoising
  steps (NFE 1, 2, 3, 5, 10, 20 by default, and the trained one), together with the relative error
  Σ‖Ẑ_s − Z_t‖² / Σ‖Z_t‖² (sums over the whole test set) and, for reference, the same error before denoising;
- along the trained chain, step by step, the distance of the chain's state x_k and of its clean estimate
  x̂_0 = (x_k − √(1−ᾱ_t)·Φ(x_k, t)) / √ᾱ_t to the teacher, both through the head's ``proj``: where the
  denoising happens.

Everything runs in eval mode (BatchNorm running statistics), without gradient.  The noise matching is the
training one (the noise adapter's γ), with fixed noises — the blend noise of batch b is drawn from a generator
seeded with ``seed + b`` (:func:`fixed_blend_noise`) — so every NFE sees the same noisy input.  Caveat: the
head was trained at one NFE; other NFEs reuse its Φ and ``proj``, so they show how the trained chain behaves,
not what training with that NFE would give (the paper retrains for each NFE; ``benchmarks/bench_accuracy.py``
does too, with ``--nfe``).

``python -m diffkd.eval RUN/last.pth --diagnose [FOLDER]`` prints the tables and writes
``nfe-diagnosis.json``, ``nfe-diagnosis.csv`` and ``nfe-diagnosis.png`` next to the checkpoint (or in FOLDER).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from diffkd.methods import SETTING_NAMES, build_heads, method_settings
from diffkd.losses import DISTANCES, mse_loss
from diffkd.models import FeatureLogitTaps, create_model, default_taps, match_spatial, probe_taps
from diffkd.modules import DiffKDHead

DEFAULT_NFES = (1, 2, 3, 5, 10, 20)
REPORT_NAME = "nfe-diagnosis"


@dataclass
class NFERow:
    nfe: int
    kd_distance: float   # the head's own KD distance (MSE, or KL / DIST on logits), mean over the test images
    rel_error: float     # Σ‖proj(chain(x_T)) − Z_t‖² / Σ‖Z_t‖² over the test set
    trained: bool


@dataclass
class StepRow:
    step: int            # 0: the chain's input x_T; k: after the k-th DDIM step
    t: int               # the noise level of x_k: the start's t for step 0, then each step's t_prev; −1 after the
    #                      last step (ᾱ = 1, the chain's output)
    kd_distance: float   # KD distance of proj(x_k)
    rel_error: float     # relative error of proj(x_k)
    clean_kd_distance: float | None  # KD distance of proj(x̂_0) predicted at this step (None for the last state)
    clean_rel_error: float | None


@dataclass
class HeadDiagnosis:
    head: str
    distance: str
    trained_nfe: int
    timestep_start: str
    anm: bool
    gamma_mean: float
    gamma_std: float     # over the test images
    rel_error_before: float  # Σ‖Z_s − Z_t‖² / Σ‖Z_t‖², the student before the blend and the chain
    images: int
    nfe: list[NFERow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)


class _Accumulator:
    """Test-set means of per-batch distances (weighted by batch size) and ratios of summed squared errors."""

    def __init__(self):
        self.images = 0
        self.distance_sums: dict = {}
        self.error_sums: dict = {}
        self.target_energy = 0.0

    def add_target(self, z_t: torch.Tensor) -> None:
        self.images += z_t.shape[0]
        self.target_energy += float(z_t.double().square().sum())

    def add(self, key, distance: torch.Tensor, prediction: torch.Tensor, z_t: torch.Tensor) -> None:
        batch = z_t.shape[0]
        self.distance_sums[key] = self.distance_sums.get(key, 0.0) + float(distance) * batch
        squared_error = float((prediction.double() - z_t.double()).square().sum())
        self.error_sums[key] = self.error_sums.get(key, 0.0) + squared_error

    def distance(self, key) -> float:
        return self.distance_sums[key] / self.images

    def rel_error(self, key) -> float:
        return self.error_sums[key] / self.target_energy if self.target_energy > 0 else math.inf


def fixed_blend_noise(shape: Sequence[int], seed: int, batch_index: int) -> torch.Tensor:
    """The blend noise ε of test batch ``batch_index``: float32 N(0, 1) drawn on the CPU from a generator seeded
    with ``seed + batch_index``, the same for every NFE."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed + batch_index))


def kd_distance(head: DiffKDHead, denoised: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The head's KD distance between two working maps, as its forward computes it."""
    if head.distance == "mse":
        return mse_loss(denoised, target)
    return DISTANCES[head.distance](denoised, target, temperature=head.temperature)


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """Logits (B×K) as the B×K×1×1 maps the heads work on; feature maps as they are."""
    return x[:, :, None, None] if x.dim() == 2 else x


def chain_start(head: DiffKDHead, student: torch.Tensor, teacher: torch.Tensor,
                noise: Callable[[torch.Size], torch.Tensor]):
    """(Z_s, Z_t, γ, x_T) of ``head`` for one batch: the working maps and the noise-matched chain input
    γ·Z_s + (1−γ)·ε, with ε = ``noise(shape)`` (x_T = Z_s without noise matching)."""
    z_s = head.trans(_as_map(student))
    z_t = head.ae.encoder(_as_map(teacher)) if head.use_ae else _as_map(teacher)
    if not head.use_anm:
        return z_s, z_t, torch.ones(z_s.shape[0], device=z_s.device), z_s
    gamma = head.noise_adapter(z_s)
    g = gamma.to(z_s.dtype).view(-1, 1, 1, 1)
    return z_s, z_t, gamma, g * z_s + (1 - g) * noise(z_s.shape).to(z_s.device, z_s.dtype)


def _clean_estimate(head: DiffKDHead, x: torch.Tensor, t: int) -> torch.Tensor:
    """x̂_0 = (x − √(1−ᾱ_t)·Φ(x, t)) / √ᾱ_t, the chain's estimate of the clean feature at a state x of level t."""
    alpha_bar = float(head.alphas_cumprod[t])
    eps = head.model(x, torch.tensor(t, device=x.device))
    return (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)


def _head_inputs(student: nn.Module, teacher: nn.Module, taps: Mapping[str, FeatureLogitTaps],
                 images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What each head distils for one batch: the logits, and the feature maps (the larger pooled to the other)."""
    inputs = {"logit": (student(images), teacher(images))}
    if taps:
        inputs["feature"] = match_spatial(taps["student"].feature, taps["teacher"].feature)
        for tap in taps.values():
            tap.clear()
    return inputs


def diffkd_heads(heads: Mapping[str, nn.Module]) -> dict[str, DiffKDHead]:
    """The DiffKD heads among ``heads`` (a feature and/or a logit head)."""
    found = {name: head for name, head in heads.items() if isinstance(head, DiffKDHead)}
    if not found:
        raise ValueError("the model has no DiffKD head: the NFE diagnosis needs a run trained with --method diffkd")
    unknown = sorted(set(found) - {"feature", "logit"})
    if unknown:
        raise ValueError(f"the NFE diagnosis knows the feature and logit heads of a classifier; got heads {unknown}")
    return found


@torch.no_grad()
def diagnose_heads(student: nn.Module, teacher: nn.Module, heads: Mapping[str, nn.Module], batches: Iterable, *,
                   feature_taps: tuple[str, str] | None = None, nfes: Sequence[int] = DEFAULT_NFES, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, HeadDiagnosis]:
    """The NFE sweep and the trained chain's trajectory of every DiffKD head, over ``batches`` of (images, _).

    ``heads`` maps "feature" and/or "logit" to trained heads; the feature head distils the outputs of the modules
    ``feature_taps`` = (student module, teacher module), the logit head the logits.  Models and heads run in eval
    mode (they are left there).
    """
    heads = diffkd_heads(heads)
    if not nfes or any(not isinstance(n, int) or n < 1 for n in nfes):
        raise ValueError(f"nfes must be positive integers (numbers of denoising steps), got {list(nfes)}")
    if "feature" in heads and not feature_taps:
        raise ValueError("a feature head needs feature_taps=(student module, teacher module) naming the feature maps")
    for module in (student, teacher, *heads.values()):
        module.eval()
    taps = ({"student": FeatureLogitTaps(student, feature_taps[0]), "teacher": FeatureLogitTaps(teacher, feature_taps[1])}
            if "feature" in heads else {})
    sweeps = {name: sorted(set(nfes) | {head.inference_steps}) for name, head in heads.items()}
    totals = {name: _Accumulator() for name in heads}
    gammas: dict[str, list[torch.Tensor]] = {name: [] for name in heads}
    try:
        for batch_index, (images, *_) in enumerate(batches):
            inputs = _head_inputs(student, teacher, taps, images.to(device))
            for name, head in heads.items():
                total = totals[name]
                z_s, z_t, gamma, x_start = chain_start(
                    head, *inputs[name], lambda shape: fixed_blend_noise(shape, seed, batch_index))
                total.add_target(z_t)
                gammas[name].append(gamma.float().cpu())
                total.add("before", kd_distance(head, z_s, z_t), z_s, z_t)
                for nfe in sweeps[name]:
                    final, trajectory = head.denoise(x_start, nfe, return_trajectory=True)
                    denoised = head.proj(final)
                    total.add(("nfe", nfe), kd_distance(head, denoised, z_t), denoised, z_t)
                    if nfe == head.inference_steps:
                        _add_trajectory(total, head, x_start, trajectory, z_t)
    finally:
        for tap in taps.values():
            tap.remove()
    if not any(total.images for total in totals.values()):
        raise ValueError("no test images to diagnose on: the loader gave no batch")
    return {name: _summarise(name, head, totals[name], torch.cat(gammas[name]), sweeps[name])
            for name, head in heads.items()}


def _add_trajectory(total: _Accumulator, head: DiffKDHead, x_start: torch.Tensor, trajectory: list[torch.Tensor],
                    z_t: torch.Tensor) -> None:
    """Each state of the trained chain through proj, and the clean estimate Φ makes from it."""
    pairs = head.schedule.step_pairs(head.inference_steps, head.timestep_start)
    states = [x_start, *trajectory]
    for step, x in enumerate(states):
        projected = head.proj(x)
        total.add(("state", step), kd_distance(head, projected, z_t), projected, z_t)
        if step < len(pairs):  # the last state is the chain's output, no further prediction from it
            clean = head.proj(_clean_estimate(head, x, pairs[step][0]))
            total.add(("clean", step), kd_distance(head, clean, z_t), clean, z_t)


def _summarise(name: str, head: DiffKDHead, total: _Accumulator, gamma: torch.Tensor,
               sweep: Sequence[int]) -> HeadDiagnosis:
    pairs = head.schedule.step_pairs(head.inference_steps, head.timestep_start)
    levels = [pairs[0][0]] + [max(t_prev, -1) for _, t_prev in pairs]
    diagnosis = HeadDiagnosis(name, head.distance, head.inference_steps, head.timestep_start, head.use_anm,
                              float(gamma.mean()), float(gamma.std(correction=0)), total.rel_error("before"),
                              total.images)
    diagnosis.nfe = [NFERow(n, total.distance(("nfe", n)), total.rel_error(("nfe", n)), n == head.inference_steps)
                     for n in sweep]
    for step, level in enumerate(levels):
        has_clean = ("clean", step) in total.distance_sums
        diagnosis.steps.append(StepRow(
            step, level, total.distance(("state", step)), total.rel_error(("state", step)),
            total.distance(("clean", step)) if has_clean else None,
            total.rel_error(("clean", step)) if has_clean else None))
    return diagnosis


# ---------------------------------------------------------------------------------------------------------------
# From a training checkpoint
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainedRun:
    """A DiffKD run rebuilt from its checkpoint: the frozen teacher, the trained student and heads."""
    student: nn.Module
    teacher: nn.Module
    heads: dict[str, nn.Module]
    feature_taps: tuple[str, str]  # (student module, teacher module) whose outputs the feature head distils


def rebuild_run(run_args: Mapping, student_state: Mapping, heads_state: Mapping, info: Mapping) -> TrainedRun:
    """The run's teacher, student and heads from its stored settings (``args`` of a ``diffkd.train``
    checkpoint), with the trained student and heads loaded strictly."""
    if run_args.get("method") != "diffkd":
        raise ValueError(f"the NFE diagnosis needs a DiffKD run; this checkpoint was trained with --method "
                         f"{run_args.get('method')}")
    settings = method_settings("diffkd", run_args["dataset"],
                               **{name: run_args.get(name) for name in SETTING_NAMES if name != "method"})
    input_size = (info["in_chans"], info["image_size"], info["image_size"])
    student = create_model(run_args["student"], num_classes=info["num_classes"], in_chans=info["in_chans"])
    teacher_ckpt = run_args.get("teacher_ckpt")
    if teacher_ckpt and not Path(teacher_ckpt).is_file():
        raise ValueError(f"the run's teacher checkpoint {teacher_ckpt} does not exist any more; the diagnosis needs "
                         f"the teacher the student was distilled from")
    teacher = create_model(run_args["teacher"], num_classes=info["num_classes"], in_chans=info["in_chans"],
                           pretrained=bool(run_args.get("teacher_pretrained")), checkpoint=teacher_ckpt)
    shapes, features = {}, {}
    for role, model in (("student", student), ("teacher", teacher)):
        feature, logits = default_taps(run_args[role], model, input_size)
        features[role] = run_args.get(f"{role}_feature") or feature
        probed = probe_taps(model, [features[role], logits], input_size)
        shapes[role] = {"feature": probed[features[role]][1:], "logit": probed[logits][1:]}
    heads = nn.ModuleDict(build_heads(settings, shapes["student"], shapes["teacher"]))
    student.load_state_dict(student_state)
    heads.load_state_dict(heads_state)
    return TrainedRun(student, teacher, dict(heads.items()), (features["student"], features["teacher"]))


def diagnose_checkpoint(checkpoint: Mapping, *, batches: Iterable, info: Mapping, nfes: Sequence[int] = DEFAULT_NFES,
                        seed: int = 0, device: torch.device | str = "cpu") -> dict[str, HeadDiagnosis]:
    """:func:`diagnose_heads` for a ``diffkd.train`` checkpoint (its ``args``, ``student`` and ``heads``);
    ``batches`` are the test set's (images, targets), ``info`` the dataset facts of ``diffkd.data.build_datasets``."""
    run = rebuild_run(checkpoint["args"], checkpoint["student"], checkpoint["heads"], info)
    for module in (run.student, run.teacher, *run.heads.values()):
        module.to(device)
    return diagnose_heads(run.student, run.teacher, run.heads, batches, feature_taps=run.feature_taps, nfes=nfes,
                          seed=seed, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def format_tables(diagnoses: Mapping[str, HeadDiagnosis]) -> str:
    lines = []
    for d in diagnoses.values():
        noise = (f"γ {d.gamma_mean:.4f} ± {d.gamma_std:.4f}" if d.anm else "no noise matching (γ = 1)")
        lines += [f"{d.head} head ({d.distance} distance, trained with {d.trained_nfe} steps, {noise}), "
                  f"{d.images} test images; relative error before denoising {d.rel_error_before:.4g}",
                  f"  {'NFE':>4}  {'KD distance':>12}  {'rel. error':>11}"]
        lines += [f"  {r.nfe:>4}  {r.kd_distance:>12.5g}  {r.rel_error:>11.5g}{'  <- trained' if r.trained else ''}"
                  for r in d.nfe]
        lines += ["  along the trained chain (through proj): state x_k, and the clean estimate x̂_0 made from it",
                  f"  {'step':>4}  {'t':>4}  {'KD(x_k)':>10}  {'rel(x_k)':>10}  {'KD(x̂_0)':>10}  {'rel(x̂_0)':>10}"]
        lines += [f"  {s.step:>4}  {'end' if s.t < 0 else s.t:>4}  {s.kd_distance:>10.4g}  {s.rel_error:>10.4g}  "
                  f"{_number(s.clean_kd_distance):>10}  {_number(s.clean_rel_error):>10}" for s in d.steps]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _csv_text(diagnoses: Mapping[str, HeadDiagnosis]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["head", "table", "nfe_or_step", "t", "kd_distance", "rel_error", "clean_kd_distance",
                     "clean_rel_error", "trained"])
    for d in diagnoses.values():
        writer.writerow([d.head, "before", "", "", "", d.rel_error_before, "", "", ""])
        for r in d.nfe:
            writer.writerow([d.head, "nfe", r.nfe, "", r.kd_distance, r.rel_error, "", "", r.trained])
        for s in d.steps:
            writer.writerow([d.head, "chain", s.step, s.t, s.kd_distance, s.rel_error,
                             _number(s.clean_kd_distance), _number(s.clean_rel_error), ""])
    return text.getvalue()


def write_report(diagnoses: Mapping[str, HeadDiagnosis], folder: str | Path, *, title: str) -> list[Path]:
    """``nfe-diagnosis.json``, ``.csv`` and ``.png`` in ``folder``; returns the paths."""
    from diffkd.plots import plot_nfe_diagnosis  # matplotlib loads only when a report is drawn

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{REPORT_NAME}.json", folder / f"{REPORT_NAME}.csv"
    json_path.write_text(json.dumps({"title": title, "heads": {n: asdict(d) for n, d in diagnoses.items()}},
                                    indent=1) + "\n")
    csv_path.write_text(_csv_text(diagnoses))
    png_path = plot_nfe_diagnosis({n: asdict(d) for n, d in diagnoses.items()}, folder / f"{REPORT_NAME}.png",
                                  title=title)
    return [json_path, csv_path, png_path]


def run_diagnosis(checkpoint: Mapping, *, batches: Iterable, info: Mapping, folder: str | Path, title: str,
                  device: torch.device | str = "cpu", nfes: Sequence[int] = DEFAULT_NFES, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict[str, HeadDiagnosis]:
    """Diagnoses a checkpoint, logs the tables and writes the report files into ``folder``."""
    diagnoses = diagnose_checkpoint(checkpoint, batches=batches, info=info, nfes=nfes, seed=seed, device=device)
    log(format_tables(diagnoses).rstrip())
    written = write_report(diagnoses, folder, title=title)
    log(f"NFE diagnosis written to {', '.join(str(p) for p in written)}")
    return diagnoses

