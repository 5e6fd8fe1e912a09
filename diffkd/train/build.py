"""What a run is made of, built from its settings: data loaders, the student, teacher and heads, the optimizer
and the learning-rate schedule.  Every bad setting becomes a UsageError before anything is written."""
from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import kernels
from diffkd.compression import FIT_IMAGES, fit_compressions
from diffkd.data import build_datasets, build_loader, subset
from diffkd.distill import Distiller, build_distiller
from diffkd.methods import SETTING_NAMES, method_settings
from diffkd.graphs import CUDAGraphHead, head_path
from diffkd.models import create_model, default_taps
from diffkd.modules import DiffKDHead
from diffkd.train.errors import UsageError
from diffkd.train.runtime import Runtime


@dataclass
class Data:
    train_loader: torch.utils.data.DataLoader | None  # None when only the test set was asked for
    val_loader: torch.utils.data.DataLoader
    info: dict
    micro_batch: int
    train_size: int
    val_size: int

    @property
    def batches_per_epoch(self) -> int:
        """Full micro-batches of one epoch on this process (the loaders drop the last incomplete one)."""
        return self.train_loader.sampler.num_samples // self.micro_batch


def micro_batch_size(args: argparse.Namespace, runtime: Runtime) -> int:
    """One process's batch of one forward pass: the global --batch-size over processes and accumulation steps."""
    per_step = runtime.world_size * args.grad_accum_steps
    if args.batch_size % per_step:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by processes × --grad-accum-steps "
                         f"= {runtime.world_size} × {args.grad_accum_steps}: it is the global batch of one step")
    return args.batch_size // per_step


# The seed that picks --val-subset's images (not the run's --seed).
VAL_SUBSET_SEED = 0


def build_data(args: argparse.Namespace, runtime: Runtime, *, test_only: bool = False) -> Data:
    """The loaders of a classification run (``test_only``: the test loader alone, for evaluation)."""
    return load_data(args, runtime, lambda: build_datasets(args.dataset, args.data_dir, augment_seed=args.seed),
                     test_only=test_only, in_memory=args.dataset != "imagenet", subsets=True)


def load_data(args: argparse.Namespace, runtime: Runtime, datasets: Callable[[], tuple], *, test_only: bool,
              in_memory: bool, subsets: bool, collate: Callable | None = None, what: str | None = None) -> Data:
    """The run's loaders over ``datasets()`` = (train, test, info): --train-subset / --val-subset (when
    ``subsets``; a dataset may apply them itself), per-process batches, workers (none for in-memory data by
    default).  Bad data or settings become a UsageError naming ``what`` (default: the dataset)."""
    micro_batch = micro_batch_size(args, runtime)
    try:
        train_ds, val_ds, info = datasets()
        if subsets and args.train_subset:
            train_ds = subset(train_ds, min(args.train_subset, len(train_ds)), seed=args.seed)
        if subsets and args.val_subset:
            # One fixed test subset per dataset, whatever the run's seed or method: runs stay comparable.
            val_ds = subset(val_ds, min(args.val_subset, len(val_ds)), seed=VAL_SUBSET_SEED)
        workers = args.workers if args.workers is not None else (0 if in_memory else min(8, os.cpu_count() or 1))
        train_loader = None if test_only else build_loader(train_ds, micro_batch, train=True, num_workers=workers,
                                                           distributed=runtime.distributed, seed=args.seed,
                                                           collate_fn=collate)
        val_loader = build_loader(val_ds, args.eval_batch_size or 2 * micro_batch, train=False,
                                  num_workers=workers, distributed=runtime.distributed, collate_fn=collate)
    except (OSError, ValueError) as error:
        raise UsageError(f"dataset {what or args.dataset}: {error}") from None
    return Data(train_loader, val_loader, info, micro_batch, len(train_ds), len(val_ds))


def create_classifier(name: str, role: str, info: dict, **kwargs) -> nn.Module:
    try:
        return create_model(name, num_classes=info["num_classes"], in_chans=info["in_chans"], **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"{role} {name!r}: {error}") from None


def _taps(name: str, model: nn.Module, feature: str | None, input_size: tuple[int, int, int]) -> tuple[str, str]:
    try:
        default_feature, logits = default_taps(name, model, input_size)
    except ValueError as error:
        raise UsageError(f"model {name!r}: {error}") from None
    return feature or default_feature, logits


def check_backend(backend: str | None, device: torch.device) -> None:
    """Refuses, before a run starts, a kernel backend that cannot run on its device."""
    if backend == "triton" and device.type != "cuda" and not kernels._common.interpreter_enabled():
        raise UsageError(f"--backend triton runs the fused Triton kernels, which need a CUDA GPU, and this run is on "
                         f"{device.type}; use --backend auto (or torch), which runs the same method with PyTorch ops")
    if backend == "triton" and not kernels._common.triton_importable():
        raise UsageError("--backend triton needs the triton package, which does not import here (it ships with "
                         "PyTorch's Linux builds); use --backend auto or torch")


def build_model(args: argparse.Namespace, info: dict, runtime: Runtime) -> Distiller:
    """The student (seeded), the teacher (loaded strictly) and the method's heads, as one Distiller."""
    if not args.student:
        raise UsageError("--student is required (e.g. --student resnet8x4); run without any arguments, or with "
                         "--demo, for the Fashion-MNIST demo")
    settings_values = {name: getattr(args, name) for name in SETTING_NAMES if name != "method"}
    try:
        settings = method_settings(args.method, args.dataset, **settings_values)
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_backend(settings.backend if settings.head_kinds else None, runtime.device)
    input_size = (info["in_chans"], info["image_size"], info["image_size"])
    torch.manual_seed(args.seed)
    student = create_classifier(args.student, "student" if settings.head_kinds else "model", info)
    teacher = None
    if settings.head_kinds:
        if not args.teacher:
            raise UsageError(f"method {args.method!r} needs --teacher (and --teacher-ckpt or --teacher-pretrained); "
                             f"use --method none to train a model alone")
        if not (args.teacher_ckpt or args.teacher_pretrained):
            raise UsageError(f"the teacher {args.teacher!r} has no weights: pass --teacher-ckpt FILE or "
                             f"--teacher-pretrained. A randomly initialised teacher teaches nothing; train one with "
                             f"--method none --student {args.teacher}")
        teacher = create_classifier(args.teacher, "teacher", info, pretrained=args.teacher_pretrained,
                          checkpoint=args.teacher_ckpt)
    elif args.teacher or args.teacher_ckpt:
        runtime.log(f"note: method none trains {args.student} alone; the teacher settings are not used")
    student_taps = _taps(args.student, student, args.student_feature, input_size) if teacher is not None else None
    teacher_taps = _taps(args.teacher, teacher, args.teacher_feature, input_size) if teacher is not None else None
    try:
        distiller = build_distiller(settings, student, teacher, student_taps=student_taps, teacher_taps=teacher_taps,
                                    input_size=input_size, log=runtime.log)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if settings.compression in ("pca", "random"):
        fit_head_compressions(distiller, args, runtime)
    for name in SETTING_NAMES:  # record the resolved method settings
        setattr(args, name, getattr(settings, name))
    return distiller


def fit_head_compressions(distiller: Distiller, args: argparse.Namespace, runtime: Runtime) -> None:
    """Fits a fixed (pca / random) compression of the teacher feature on the first FIT_IMAGES training images of
    the run (its --train-subset, without augmentation), before the first step.  A resumed run's checkpoint then
    replaces the fit with the one it was trained with."""
    train_ds, _, _ = build_datasets(args.dataset, args.data_dir, train_transform=False)
    if args.train_subset:
        train_ds = subset(train_ds, min(args.train_subset, len(train_ds)), seed=args.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=False)
    used = fit_compressions(distiller, loader, images=FIT_IMAGES)
    runtime.log(f"fitted the {args.compression} compression of the teacher feature on {used} training images")


def check_cuda_graph(mode: str, device_type: str) -> None:
    if mode == "on" and device_type != "cuda":
        raise UsageError(f"--cuda-graph on needs a CUDA device and this run is on {device_type}; use --cuda-graph "
                         f"auto (or off), which runs the heads eagerly here")


def graph_heads(model: Distiller, mode: str, device: torch.device, log) -> None:
    """Wraps every DiffKD head in a CUDAGraphHead when ``mode`` (--cuda-graph) asks for it on this device, and logs
    the path each head runs.  Call it after moving the model, before building the optimizer and wrapping in DDP."""
    check_cuda_graph(mode, device.type)
    graph = mode == "on" or (mode == "auto" and device.type == "cuda")
    uses = Counter(binding.head or name for name, binding in model.bindings.items())
    for name, head in model.head_modules().items():
        if not isinstance(head, DiffKDHead):
            continue
        if graph and uses[name] > 1:  # a graph replays one call per backward; a shared head is called per level
            log(f"{name} head runs {head_path(head, device)} (shared by {uses[name]} levels, so not graphed)")
            continue
        if graph:
            head = CUDAGraphHead(head)
            model.heads.set_submodule(name, head)
        log(f"{name} head runs {head_path(head, device)}"
            f"{' (captured on its first step, checked against an eager step)' if graph else ''}")


def build_optimizer(args: argparse.Namespace, model: Distiller) -> torch.optim.Optimizer:
    parameters = model.trainable_parameters()
    if args.decay_norm_bias:
        groups = [{"params": parameters, "weight_decay": args.weight_decay}]
    else:  # normalisation weights and biases are the 0/1-dimensional parameters
        groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": args.weight_decay},
                  {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    return torch.optim.AdamW(groups, lr=args.lr)


def lr_factor_schedule(args: argparse.Namespace, steps_per_epoch: int) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps: linear warm-up, then step / multistep / cosine decay.
    Decays act at epoch boundaries (as the benchmarks do); warm-up and cosine move every step."""
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    total_steps = args.epochs * steps_per_epoch
    min_factor = args.min_lr / args.lr if args.lr else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        epoch = step // steps_per_epoch
        if args.sched == "multistep":
            return args.decay_rate ** sum(epoch >= milestone for milestone in args.decay_milestones)
        if args.sched == "step":
            return args.decay_rate ** (epoch // args.decay_epochs)
        if args.sched == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def resolve_path(path: str | None) -> str | None:
    """An absolute path (so that a run can be resumed from any folder); None stays None."""
    return None if path is None else str(Path(path).expanduser().resolve())
