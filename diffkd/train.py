"""``python -m diffkd.train``: train or distil a student end to end; with no arguments, the Fashion-MNIST demo.

One command covers teachers (``--method none``), the baselines (``kd``, ``dist``, ``mse``) and DiffKD, on a CPU
or on several GPUs (``torchrun --nproc_per_node=N -m diffkd.train ...``).  Flags follow timm's ``train.py``;
``-c/--config FILE.yaml`` sets defaults whose keys are the flag names with underscores, and flags given on the
command line win.  ``-b/--batch-size`` is the *global* batch of one optimizer step (split across processes and
``--grad-accum-steps``), so a recipe means the same on any number of GPUs.

Everything a run needs to be trusted lands in ``<output>/<experiment>/``: ``args.yaml`` (every resolved setting),
``summary.csv`` (one row per epoch), ``env.txt``, ``last.pth`` / ``best.pth`` (full checkpoints, written
atomically every epoch) and ``plots/``.  ``--resume`` continues a run exactly where its last epoch ended.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import difflib
import hashlib
import io
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from diffkd.data import DATASET_NAMES, build_datasets, build_loader, subset
from diffkd.distill import HEAD_SELECTIONS, LOGIT_DISTANCES, METHODS, SETTING_NAMES, Distiller, build_distiller, \
    method_settings
from diffkd.models import create_model, default_taps
from diffkd.schedule import TIMESTEP_STARTS
from kernels._common import BACKENDS

CHECKPOINT_FORMAT = "diffkd.train"
CHECKPOINT_VERSION = 1
# Settings that may differ when a run is resumed: they change neither the model nor the data order.
RESUME_ADJUSTABLE = ("max_steps", "data_dir", "workers", "log_interval", "eval_interval", "device", "threads",
                     "eval_batch_size")
# Flags that only steer the command itself, never stored as a run's settings.
COMMAND_ONLY = ("config", "resume", "help")
CACHE_ENV = "DIFFKD_CACHE"


class UsageError(Exception):
    """Bad input, or a run that cannot go on: the message says what to do, and the command exits without a
    traceback (see ``main``)."""

    exit_code = 2


class DivergedError(UsageError):
    """The loss stopped being finite."""

    exit_code = 3


# ---------------------------------------------------------------------------------------------------------------
# Command line and configs
# ---------------------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default when it has one worth showing and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _ConfigParser(argparse.ArgumentParser):
    """Parses the tokens made from a config file; an error names the file and raises instead of exiting."""

    config_path = ""

    def error(self, message: str):
        raise UsageError(f"config {self.config_path}: {message}")


def build_parser(*, suppress_defaults: bool = False, config_path: str | None = None) -> argparse.ArgumentParser:
    """The command line.  With ``suppress_defaults`` only the flags actually given appear in the result; with
    ``config_path`` the parser checks a config file's tokens and its errors name that file."""
    parser_class = _ConfigParser if config_path else argparse.ArgumentParser
    parser = parser_class(
        prog="python -m diffkd.train",
        description="Train a student alone (--method none, also for teachers) or distil it from a teacher "
                    "(kd, dist, mse, diffkd). With no arguments: the Fashion-MNIST demo.",
        formatter_class=HelpFormatter)
    if config_path:
        parser.config_path = config_path
    add = parser.add_argument
    add("-c", "--config", help="YAML file of defaults (keys: flag names with underscores); flags given here win")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="fashion-mnist", choices=DATASET_NAMES, help="dataset and its recipe's "
                                                                                      "augmentation")
    group.add_argument("--data-dir", help="dataset folder (Fashion-MNIST defaults to the Debian package's)")
    group.add_argument("--train-subset", type=positive_int,
                       help="train on a fixed, class-balanced subset of this many training images")
    group.add_argument("--val-subset", type=positive_int, help="evaluate on a fixed subset of this many images")
    group.add_argument("--workers", type=int, help="data loader processes (default: 0 for in-memory datasets, "
                                                   "up to 8 for ImageNet)")

    group = parser.add_argument_group("models")
    group.add_argument("--student", help="student model: a CIFAR zoo name (resnet8x4, wrn_16_2, ...) or a timm name")
    group.add_argument("--teacher", help="teacher model, as --student")
    group.add_argument("--teacher-ckpt", help="teacher weights (the benchmark's {'model': ...} format and others; "
                                              "loaded strictly)")
    group.add_argument("--teacher-pretrained", action=argparse.BooleanOptionalAction, default=False,
                       help="teacher weights from the local timm / Hugging Face cache (never downloaded)")
    group.add_argument("--student-feature", help="module whose output is the student's feature map "
                                                 "(default: found by a dry forward pass)")
    group.add_argument("--teacher-feature", help="as --student-feature, for the teacher")

    group = parser.add_argument_group("method (unset values take SPEC §6's defaults for the dataset)")
    group.add_argument("--method", default="diffkd", choices=METHODS,
                       help="none trains the student alone (teachers too); the others distil from --teacher")
    group.add_argument("--ce-weight", type=non_negative_float)
    group.add_argument("--kd-weight", type=non_negative_float,
                       help="weight of the KD / DIST / MSE term, or of each DiffKD head's KD term")
    group.add_argument("--kd-temperature", type=float, help="temperature of KL and DIST")
    group.add_argument("--dist-beta", type=non_negative_float, help="DIST inter-class weight")
    group.add_argument("--dist-gamma", type=non_negative_float, help="DIST intra-class weight")
    group.add_argument("--diffusion-weight", type=non_negative_float, help="DiffKD diffusion-loss weight")
    group.add_argument("--ae-weight", type=non_negative_float, help="DiffKD autoencoder-loss weight")
    group.add_argument("--heads", choices=tuple(HEAD_SELECTIONS), help="DiffKD heads (default both)")
    group.add_argument("--ae-channels", type=int,
                       help="DiffKD feature-head autoencoder width, 0 for none (default: 0 on CIFAR-100 and "
                            "Fashion-MNIST, 1024 on ImageNet)")
    group.add_argument("--nfe", type=positive_int, help="DiffKD denoising steps (default 5)")
    group.add_argument("--anm", action=argparse.BooleanOptionalAction,
                       help="DiffKD adaptive noise matching (default on; --no-anm is the ablation)")
    group.add_argument("--logit-distance", choices=LOGIT_DISTANCES,
                       help="DiffKD logit-head distance: kl, or dist for the paper's DiffKD† (default kl)")
    group.add_argument("--timestep-start", choices=TIMESTEP_STARTS,
                       help="DDIM grid: the official code's (default) or the paper's start at t = 500")
    group.add_argument("--backend", choices=BACKENDS, help="DiffKD kernels (default auto: Triton on CUDA)")

    group = parser.add_argument_group("optimisation (defaults: SPEC §6's CIFAR-100 recipe A1)")
    group.add_argument("--epochs", type=positive_int, default=240, help="training epochs")
    group.add_argument("-b", "--batch-size", type=positive_int, default=64,
                       help="global batch of one optimizer step, over all processes and accumulation steps")
    group.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    group.add_argument("--opt", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov momentum")
    group.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="weight decay")
    group.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction, default=True,
                       help="apply weight decay to normalisation weights and biases (B1 uses --no-decay-norm-bias)")
    group.add_argument("--sched", choices=("multistep", "step", "cosine", "constant"), default="multistep",
                       help="learning-rate schedule after the warm-up")
    group.add_argument("--decay-milestones", type=positive_int, nargs="+", default=[150, 180, 210],
                       help="multistep: epochs at which the LR is multiplied by --decay-rate")
    group.add_argument("--decay-epochs", type=positive_int, default=30,
                       help="step: the LR is multiplied by --decay-rate every this many epochs")
    group.add_argument("--decay-rate", type=float, default=0.1, help="step / multistep: LR factor at each decay")
    group.add_argument("--min-lr", type=non_negative_float, default=0.0, help="cosine: the final LR")
    group.add_argument("--warmup-epochs", type=non_negative_float, default=0.0,
                       help="linear LR warm-up from 0, per step (fractions allowed)")
    group.add_argument("--grad-accum-steps", type=positive_int, default=1,
                       help="micro-batches accumulated into one optimizer step")

    group = parser.add_argument_group("runtime")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                       help="mixed precision (autocast); the DDIM constants stay float32")
    group.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16",
                       help="float16 adds a gradient scaler")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="channels-last memory format for the models and images")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    group.add_argument("--threads", type=positive_int,
                       help="CPU threads per process (default: $OMP_NUM_THREADS, else every core available)")
    group.add_argument("--seed", type=int, default=0,
                       help="initialisation, data order, augmentation and DiffKD noise; same seed, same run")

    group = parser.add_argument_group("output")
    group.add_argument("--output", default="output", help="folder holding the experiment folders")
    group.add_argument("--experiment", help="experiment folder name (default: <dataset>-<method>-<models>-seed<seed>)")
    group.add_argument("--resume", nargs="?", const="", metavar="PATH",
                       help="continue a run: its experiment folder or checkpoint file (alone: "
                            "<output>/<experiment>/last.pth)")
    group.add_argument("--max-steps", type=positive_int,
                       help="stop after this many optimizer steps (smoke runs); the epoch in progress is closed "
                            "there: evaluated and checkpointed")
    group.add_argument("--log-interval", type=positive_int, default=50, help="optimizer steps between progress lines")
    group.add_argument("--eval-interval", type=positive_int, default=1,
                       help="epochs between test-set evaluations (the last epoch is always evaluated)")
    group.add_argument("--eval-batch-size", type=positive_int, help="per process (default: twice the training one)")

    group = parser.add_argument_group("demo (the default when no arguments are given)")
    group.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                       help="teacher, then the student alone and with DiffKD over --demo-seeds, and a table")
    group.add_argument("--demo-seeds", type=int, nargs="+", help="seeds of the student runs")
    group.add_argument("--demo-teacher-epochs", type=positive_int, help="epochs of the demo's teacher")
    group.add_argument("--demo-teacher-subset", type=positive_int,
                       help="training images of the demo's teacher (default: all)")
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def _config_tokens(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], set[str]]:
    """The config file as command-line tokens (so argparse checks every value) and the keys it sets."""
    try:
        with open(path) as file:
            content = yaml.safe_load(file)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist; pass -c with a YAML file such as "
                         f"configs/cifar100/diffkd/resnet32x4_resnet8x4.yaml") from None
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"config file {path} could not be read as YAML: {error}") from None
    if content is None:
        return [], set()
    if not isinstance(content, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings (flag names with underscores), "
                         f"got a {type(content).__name__}")
    actions = {action.dest: action for action in parser._actions if action.dest not in COMMAND_ONLY}
    tokens: list[str] = []
    for key, value in content.items():
        if key not in actions:
            hint = difflib.get_close_matches(str(key).replace("-", "_"), list(actions), n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise UsageError(f"config {path}: unknown key {key!r}.{suggestion} Keys are the flag names with "
                             f"underscores (see python -m diffkd.train --help).")
        flag = next(option for option in actions[key].option_strings if option.startswith("--"))
        if value is None:
            continue
        if isinstance(actions[key], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"config {path}: {key} must be true or false, got {value!r}")
            tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            tokens += [flag, *map(str, value)]
        elif isinstance(value, dict) or isinstance(value, bool):
            raise UsageError(f"config {path}: {key} must be a {'list or ' if actions[key].nargs else ''}single "
                             f"value, got {value!r}")
        else:
            tokens += [flag, str(value)]
    return tokens, set(content)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, set[str]]:
    """Defaults, overlaid by the config file, overlaid by the command line.  Also returns the names of the
    settings that were given explicitly (by the config or the command line); no arguments at all means --demo."""
    argv = list(argv) or ["--demo"]
    parser = build_parser()
    parser.parse_args(argv)  # --help (with the defaults shown) and errors in the flags, before the config is read
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    explicit = set(given) - set(COMMAND_ONLY)
    config_tokens: list[str] = []
    if given.get("config"):
        config_tokens, config_keys = _config_tokens(given["config"], parser)
        explicit |= config_keys
        build_parser(config_path=given["config"]).parse_args(config_tokens)
    args = parser.parse_args(config_tokens + argv)
    if args.demo:
        _apply_demo_defaults(args, explicit)
    return args, explicit


# ---------------------------------------------------------------------------------------------------------------
# Process group, devices, precision
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    log_path: Path | None = None  # the current run's log.txt; lines printed before it exists wait in _pending
    _pending: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, message: str = "") -> None:
        """Prints on the main process and keeps the line in the current run's log.txt."""
        if not self.is_main:
            return
        print(message, flush=True)
        self._pending.append(message)
        if self.log_path is not None:
            self._flush_log()

    def _flush_log(self) -> None:
        with open(self.log_path, "a") as file:
            file.write("".join(line + "\n" for line in self._pending))
        self._pending.clear()

    def start_log_file(self, path: Path) -> None:
        self.log_path = path
        self._flush_log()

    def stop_log_file(self) -> None:
        self.log_path = None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


def setup_runtime(device_name: str, threads: int | None = None) -> Runtime:
    """Starts the process group when launched by torchrun (gloo on CPU, nccl on GPU), picks the device and
    sets the CPU threads (``threads``, else $OMP_NUM_THREADS, else every available core)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # torchrun sets OMP_NUM_THREADS=1 for several processes per machine.
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Runtime(device=device, rank=rank, world_size=world_size)


@dataclass(frozen=True)
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: float32 throughout

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------
def _wrap_input_error(what: str, error: Exception) -> UsageError:
    return UsageError(f"{what}: {error}")


@dataclass
class Data:
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    info: dict
    micro_batch: int
    train_size: int
    val_size: int


def build_data(args: argparse.Namespace, runtime: Runtime) -> Data:
    per_step = runtime.world_size * args.grad_accum_steps
    if args.batch_size % per_step:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by processes × --grad-accum-steps "
                         f"= {runtime.world_size} × {args.grad_accum_steps}: it is the global batch of one step")
    micro_batch = args.batch_size // per_step
    try:
        train_ds, val_ds, info = build_datasets(args.dataset, args.data_dir, augment_seed=args.seed)
        if args.train_subset:
            train_ds = subset(train_ds, min(args.train_subset, len(train_ds)), seed=args.seed)
        if args.val_subset:
            val_ds = subset(val_ds, min(args.val_subset, len(val_ds)), seed=args.seed)
        in_memory = args.dataset != "imagenet"
        workers = args.workers if args.workers is not None else (0 if in_memory else min(8, os.cpu_count() or 1))
        train_loader = build_loader(train_ds, micro_batch, train=True, num_workers=workers,
                                    distributed=runtime.distributed, seed=args.seed)
        val_loader = build_loader(val_ds, args.eval_batch_size or 2 * micro_batch, train=False,
                                  num_workers=workers, distributed=runtime.distributed)
    except (OSError, ValueError) as error:
        raise _wrap_input_error(f"dataset {args.dataset}", error) from None
    return Data(train_loader, val_loader, info, micro_batch, len(train_ds), len(val_ds))


def _create(name: str, role: str, info: dict, **kwargs) -> nn.Module:
    try:
        return create_model(name, num_classes=info["num_classes"], in_chans=info["in_chans"], **kwargs)
    except (OSError, ValueError) as error:
        raise _wrap_input_error(f"{role} {name!r}", error) from None


def _taps(name: str, model: nn.Module, feature: str | None, input_size: tuple[int, int, int]) -> tuple[str, str]:
    try:
        default_feature, logits = default_taps(name, model, input_size)
    except ValueError as error:
        raise _wrap_input_error(f"model {name!r}", error) from None
    return feature or default_feature, logits


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
    input_size = (info["in_chans"], info["image_size"], info["image_size"])
    torch.manual_seed(args.seed)
    student = _create(args.student, "student", info)
    teacher = None
    if settings.head_kinds:
        if not args.teacher:
            raise UsageError(f"method {args.method!r} needs --teacher (and --teacher-ckpt or --teacher-pretrained); "
                             f"use --method none to train a model alone")
        if not (args.teacher_ckpt or args.teacher_pretrained):
            raise UsageError(f"the teacher {args.teacher!r} has no weights: pass --teacher-ckpt FILE or "
                             f"--teacher-pretrained. A randomly initialised teacher teaches nothing; train one with "
                             f"--method none --student {args.teacher}")
        teacher = _create(args.teacher, "teacher", info, pretrained=args.teacher_pretrained,
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
    for name in SETTING_NAMES:  # record the resolved method settings
        setattr(args, name, getattr(settings, name))
    return distiller


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes through a temporary file in the same folder, then renames: a crash never leaves half a file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda file: file.write(text.encode()))


def capture_rng_state() -> dict:
    """Every random stream of this process, as plain Python values (they travel through all_gather_object)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": numpy_state["bit_generator"], "key": numpy_state["state"]["key"].tolist(),
                  "pos": numpy_state["state"]["pos"], "has_gauss": numpy_state["has_gauss"],
                  "gauss": numpy_state["gauss"]},
        "torch": torch.get_rng_state().tolist(),
        "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": np.array(numpy_state["key"], dtype=np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_checkpoint_file(path: Path):
    """The content of a checkpoint file (read with weights_only=True), or a clear UsageError."""
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports damaged files with many exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"checkpoint {path} could not be read ({first_line}); the file looks truncated or "
                         f"corrupted. If a run was writing it, use the other checkpoint in the folder "
                         f"(best.pth / last.pth)") from None


def as_training_checkpoint(content, path: Path, *, required: bool = True) -> dict | None:
    """``content`` if it is a training checkpoint of this module; otherwise None, or with ``required`` a
    UsageError saying what the file is instead."""
    if not (isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT):
        if not required:
            return None
        keys = ", ".join(map(repr, list(content)[:8])) if isinstance(content, dict) else type(content).__name__
        raise UsageError(f"{path} is not a diffkd training checkpoint (it holds {keys}); --resume and diffkd.eval "
                         f"take the last.pth / best.pth of a diffkd run. For a teacher's weights use --teacher-ckpt")
    if content.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint version {content.get('version')!r}; this diffkd reads version "
                         f"{CHECKPOINT_VERSION}")
    return content


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint written by this module, or a clear UsageError."""
    return as_training_checkpoint(load_checkpoint_file(path), path)


def export_student(checkpoint: dict, path: Path) -> None:
    """The student of a training checkpoint alone, in the CIFAR benchmark's format: ``{"model": state_dict}``
    plus ``epoch``, ``accuracy`` (last-epoch test top-1) and ``arch``; written atomically."""
    history = checkpoint["history"]
    content = {"model": checkpoint["student"], "epoch": checkpoint["epoch"],
               "accuracy": history[-1].get("val_top1", float("nan")) if history else float("nan"),
               "arch": checkpoint["args"]["student"]}
    _write_atomically(path, lambda file: torch.save(content, file))


# ---------------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------------
def default_experiment_name(args: argparse.Namespace) -> str:
    models = args.student if args.method == "none" else f"{args.teacher}_{args.student}"
    return f"{args.dataset}-{args.method}-{models}-seed{args.seed}".replace("/", "_")


def check_output_folder(folder: Path, *, resume: bool) -> None:
    """Refuses, before anything is written, an output path that is a file or a finished experiment folder."""
    for path in [*reversed(folder.parents), folder]:
        if path.exists() and not path.is_dir():
            raise UsageError(f"output path {path} is a file, not a folder; pass --output / --experiment naming a "
                             f"folder (nothing was written)")
    if not resume and folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"experiment folder {folder} already holds a run; pass --resume to continue it, or "
                         f"--experiment NAME for a new folder (nothing was overwritten)")


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed, or metadata unreadable: the report just says so
        return "not installed"


def environment_report(runtime: Runtime, argv: Sequence[str]) -> str:
    lines = [f"started: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"command: python -m diffkd.train {shlex.join(argv)}",
             f"python: {platform.python_version()} ({platform.platform()})"]
    lines += [f"{name}: {_package_version(name)}" for name in ("torch", "torchvision", "timm", "triton", "numpy")]
    if runtime.device.type == "cuda":
        properties = torch.cuda.get_device_properties(runtime.device)
        lines.append(f"device: {runtime.world_size} × {properties.name} ({properties.total_memory / 2**30:.0f} GiB), "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        lines.append(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads per process, "
                     f"{runtime.world_size} process(es))")
    return "\n".join(lines) + "\n"


def write_summary(path: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    _write_text(path, text.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    folder: Path
    last_top1: float  # test top-1 (%) after the last epoch
    best_top1: float
    best_epoch: int
    teacher_top1: float | None
    test_images: int


def _to_device(batch, runtime: Runtime, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch
    images = images.to(runtime.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(runtime.device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, precision: Precision, channels_last: bool) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole loader, summed across processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-5, count
    for batch in loader:
        images, targets = _to_device(batch, runtime, channels_last)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), torch.tensor(targets.numel(), device=runtime.device)]).double()
    model.train(was_training)
    loss_sum, top1, top5, count = runtime.all_reduce_sum(totals).tolist()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss_sum / count}


class Trainer:
    """One run: the loop, its checkpoints and its outputs."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, argv: Sequence[str],
                 resume_from: dict | None = None):
        self.args, self.runtime = args, runtime
        self.folder = Path(args.output) / args.experiment
        check_output_folder(self.folder, resume=resume_from is not None)
        self.data = build_data(args, runtime)
        self.model = build_model(args, self.data.info, runtime)
        self.model.to(runtime.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype] if args.amp else None
        self.precision = Precision(runtime.device.type, amp_dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp_dtype == torch.float16)
        self.optimizer = build_optimizer(args, self.model)
        self.steps_per_epoch = len(self.data.train_loader) // args.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise UsageError(f"an epoch has {len(self.data.train_loader)} batches, fewer than --grad-accum-steps "
                             f"{args.grad_accum_steps}: use fewer accumulation steps or more data")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_factor_schedule(args, self.steps_per_epoch))
        self.history: list[dict] = []
        self.start_epoch = self.global_step = 0
        self.best_top1, self.best_epoch = -1.0, 0
        self.teacher_top1: float | None = None
        if resume_from is not None:
            self._restore(resume_from)
        # Each process draws its own DiffKD noise; the seed offset keeps a one-process run at --seed itself.
        elif runtime.distributed:
            torch.manual_seed(args.seed + runtime.rank)
        self.ddp_model = (nn.parallel.DistributedDataParallel(self.model, device_ids=[runtime.device.index]
                                                              if runtime.device.type == "cuda" else None)
                          if runtime.distributed else self.model)
        runtime.barrier()
        if runtime.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_text(self.folder / "args.yaml", yaml.safe_dump(_stored_args(args), sort_keys=False))
            report = environment_report(runtime, argv)
            with open(self.folder / "env.txt", "a") as file:
                file.write(("\nresumed after epoch %d\n" % self.start_epoch if resume_from else "") + report)
            runtime.start_log_file(self.folder / "log.txt")
        self._describe()

    # ---- start-up ------------------------------------------------------------------------------------------
    def _describe(self) -> None:
        args, data, log = self.args, self.data, self.runtime.log
        student_parameters = sum(p.numel() for p in self.model.student.parameters())
        log(f"run {self.folder}: {args.method} on {args.dataset} ({data.train_size} training / {data.val_size} test "
            f"images), {self.runtime.world_size} process(es) on {self.runtime.device.type}")
        log(f"student {args.student}: {student_parameters / 1e6:.3f} M parameters; extra training-time parameters "
            f"(heads): {self.model.extra_parameter_count() / 1e6:.3f} M")
        log(f"batch {args.batch_size} = {self.runtime.world_size} process(es) × {data.micro_batch} × "
            f"{args.grad_accum_steps} accumulation step(s); {self.steps_per_epoch} steps per epoch; {args.opt} "
            f"lr {args.lr} ({args.sched}), weight decay {args.weight_decay}"
            f"{', AMP ' + args.amp_dtype if args.amp else ''}")
        dropped = len(data.train_loader) % args.grad_accum_steps
        if dropped:
            log(f"note: the last {dropped} batch(es) of each epoch do not fill an accumulation step and are skipped")

    def measure_teacher(self) -> None:
        if self.model.teacher is None or self.teacher_top1 is not None:
            return
        metrics = evaluate(self.model.teacher, self.data.val_loader, self.runtime, self.precision,
                           self.args.channels_last)
        self.teacher_top1 = metrics["top1"]
        chance = 100 / self.data.info["num_classes"]
        self.runtime.log(f"teacher {self.args.teacher}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% "
                         f"on {self.data.val_size} test images")
        if metrics["top1"] < 2 * chance:
            self.runtime.log(f"warning: the teacher is near chance level ({chance:.1f}%): are --teacher-ckpt and "
                             f"--dataset right?")

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict]:
        state = capture_rng_state()
        if not self.runtime.distributed:
            return [state]
        states: list = [None] * self.runtime.world_size
        dist.all_gather_object(states, state)
        return states

    def _checkpoint(self, epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
            "global_step": self.global_step, "args": _stored_args(self.args),
            "student": self.model.student.state_dict(), "heads": self.model.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": self._gather_rng(), "history": self.history,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "teacher_top1": self.teacher_top1,
        }

    def _save(self, epoch: int, is_best: bool) -> None:
        checkpoint = self._checkpoint(epoch)  # every process takes part (RNG states are gathered)
        if not self.runtime.is_main:
            return
        _write_atomically(self.folder / "last.pth", lambda file: torch.save(checkpoint, file))
        if is_best:
            _write_atomically(self.folder / "best.pth", lambda file: torch.save(checkpoint, file))

    def _restore(self, checkpoint: dict) -> None:
        try:
            self.model.student.load_state_dict(checkpoint["student"])
            self.model.heads.load_state_dict(checkpoint["heads"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UsageError(f"the checkpoint does not fit the run it claims to be ({error}); was it written by "
                             f"another version of diffkd?") from None
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch, self.global_step = checkpoint["epoch"], checkpoint["global_step"]
        self.history = list(checkpoint["history"])
        self.best_top1, self.best_epoch = checkpoint["best_top1"], checkpoint["best_epoch"]
        self.teacher_top1 = checkpoint["teacher_top1"]
        rng_states = checkpoint["rng"]
        if len(rng_states) == self.runtime.world_size:
            restore_rng_state(rng_states[self.runtime.rank])
        else:
            self.runtime.log(f"note: the checkpoint was written by {len(rng_states)} process(es) and this run has "
                             f"{self.runtime.world_size}: random streams restart from --seed, so the run continues "
                             f"but not bit-identically")
            torch.manual_seed(self.args.seed + self.runtime.rank)
        self.runtime.log(f"resumed after epoch {self.start_epoch} (step {self.global_step}); best top-1 so far "
                         f"{self.best_top1:.2f}% (epoch {self.best_epoch})")

    # ---- the loop ------------------------------------------------------------------------------------------
    def _check_finite(self, out: dict, epoch: int, step_in_epoch: int) -> None:
        bad = (~torch.isfinite(out["loss"].detach())).float()
        if self.runtime.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k != "logits" and v.dim() == 0)
        last = self.folder / "last.pth"
        kept = (f"the last good checkpoint, {last} (epoch {self.history[-1]['epoch']}), is untouched"
                if self.history else "no checkpoint had been written yet")
        raise DivergedError(
            f"the loss is not finite at epoch {epoch + 1}, step {step_in_epoch + 1} ({terms}); training stopped and "
            f"{kept}. Start a new run (--experiment NAME) with a lower --lr or --warmup-epochs, or without --amp / "
            f"with --amp-dtype bfloat16: resuming with the same settings would repeat the same steps")

    def train_epoch(self, epoch: int) -> tuple[dict, bool]:
        """One epoch (or its part up to --max-steps); returns the epoch-mean metrics and whether to stop."""
        args, runtime = self.args, self.runtime
        loader = self.data.train_loader
        loader.sampler.set_epoch(epoch)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        usable_batches = self.steps_per_epoch * args.grad_accum_steps
        step_in_epoch, stop = 0, False
        started = interval_start = time.perf_counter()
        interval_images = 0
        for index, batch in enumerate(loader):
            if index >= usable_batches:
                break
            images, targets = _to_device(batch, runtime, args.channels_last)
            closes_step = (index + 1) % args.grad_accum_steps == 0
            sync = self.ddp_model.no_sync() if runtime.distributed and not closes_step else nullcontext()
            with sync:
                with self.precision.autocast():
                    out = self.ddp_model(images, targets)
                self._check_finite(out, epoch, step_in_epoch)
                self.scaler.scale(out["loss"] / args.grad_accum_steps).backward()
            batch_size = targets.shape[0]
            seen += batch_size
            interval_images += batch_size
            out["top1"] = (out["logits"].detach().argmax(1) == targets).float().mean() * 100
            for key, value in out.items():
                if key != "logits":
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * batch_size
            if not closes_step:
                continue
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
            step_in_epoch += 1
            stop = args.max_steps is not None and self.global_step >= args.max_steps
            if step_in_epoch % args.log_interval == 0 or step_in_epoch == self.steps_per_epoch or stop:
                now = time.perf_counter()
                rate = interval_images * runtime.world_size / max(now - interval_start, 1e-9)
                runtime.log(f"epoch {epoch + 1}/{args.epochs} step {step_in_epoch}/{self.steps_per_epoch} "
                            f"loss {out['loss'].item():.4f} ce {out['ce_loss'].item():.4f} "
                            f"lr {self.optimizer.param_groups[0]['lr']:.4g} {rate:.0f} img/s")
                interval_start, interval_images = now, 0
            if stop:
                break
        elapsed = time.perf_counter() - started
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(seen), device=runtime.device)])
        totals = runtime.all_reduce_sum(totals.double()).tolist()
        metrics = {f"train_{k}": v / totals[-1] for k, v in zip(keys, totals)}
        metrics.update(steps=step_in_epoch, epoch_time_s=elapsed, images_per_s=totals[-1] / max(elapsed, 1e-9))
        return metrics, stop

    def fit(self) -> RunResult:
        args, runtime = self.args, self.runtime
        self.measure_teacher()
        epoch = self.start_epoch
        if self.start_epoch >= args.epochs:
            runtime.log(f"nothing to do: the run already finished its {args.epochs} epochs")
        while epoch < args.epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            train_metrics, stop = self.train_epoch(epoch)
            epoch += 1
            row = {"epoch": epoch, "lr": lr, **train_metrics}
            if stop or epoch == args.epochs or epoch % args.eval_interval == 0:
                val = evaluate(self.model.student, self.data.val_loader, runtime, self.precision, args.channels_last)
                row.update(val_top1=val["top1"], val_top5=val["top5"], val_loss=val["loss"])
            is_best = row.get("val_top1", -1.0) > self.best_top1
            if is_best:
                self.best_top1, self.best_epoch = row["val_top1"], epoch
            self.history.append(row)
            self._save(epoch, is_best)
            if runtime.is_main:
                self._write_outputs()
            # Terms that are zero throughout (a head's AE loss without an AE) are left out of the line.
            terms = " ".join(f"{k[6:]} {v:.4g}" for k, v in train_metrics.items()
                             if k.startswith("train_") and k not in ("train_loss", "train_top1") and v != 0)
            test = (f"test top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%" if "val_top1" in row
                    else "not evaluated")
            runtime.log(f"epoch {epoch}/{args.epochs}: train loss {train_metrics['train_loss']:.4f} ({terms}) | "
                        f"{test} | {train_metrics['images_per_s']:.0f} img/s, {train_metrics['epoch_time_s']:.1f} s")
            if stop:
                runtime.log(f"stopped at --max-steps {args.max_steps}")
                break
        last_top1 = self.history[-1].get("val_top1", float("nan")) if self.history else float("nan")
        last_epoch = self.history[-1]["epoch"] if self.history else 0
        teacher = f"; teacher {self.teacher_top1:.2f}%" if self.teacher_top1 is not None else ""
        runtime.log(f"final: last-epoch top-1 {last_top1:.2f}% (epoch {last_epoch}), best top-1 {self.best_top1:.2f}% "
                    f"(epoch {self.best_epoch}){teacher}; outputs in {self.folder}")
        return RunResult(self.folder, last_top1, self.best_top1, self.best_epoch, self.teacher_top1,
                         self.data.val_size)

    def _write_outputs(self) -> None:
        write_summary(self.folder / "summary.csv", self.history)
        from diffkd.plots import plot_history  # matplotlib loads only when a run writes plots
        plot_history(self.history, self.folder / "plots")


def _stored_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in COMMAND_ONLY}


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
def resolve_resume(args: argparse.Namespace, explicit: set[str]) -> tuple[argparse.Namespace, dict]:
    """The saved run's settings (with the adjustable ones given now) and its checkpoint."""
    if args.resume:
        path = Path(args.resume)
        path = path / "last.pth" if path.is_dir() else path
    else:
        path = Path(args.output) / (args.experiment or default_experiment_name(args)) / "last.pth"
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; pass --resume with the experiment folder (or its "
                         f"last.pth) of the run to continue")
    checkpoint = read_checkpoint(path)
    saved = checkpoint["args"]
    changed = [f"{key} (saved {saved.get(key)!r}, given {getattr(args, key)!r})" for key in sorted(explicit)
               if key not in RESUME_ADJUSTABLE + ("output", "experiment", "epochs") and key in saved
               and saved[key] != getattr(args, key)]
    if changed:
        raise UsageError(f"--resume continues the saved run, whose settings differ from the ones given: "
                         f"{'; '.join(changed)}. Drop those flags, or start a new run with --experiment NAME")
    merged = argparse.Namespace(**{**vars(build_parser().parse_args([])), **saved})
    for key in explicit & set(RESUME_ADJUSTABLE + ("epochs",)):
        setattr(merged, key, getattr(args, key))
    if merged.epochs != saved["epochs"]:
        print(f"note: --epochs changed from {saved['epochs']} to {merged.epochs}: the LR schedule is recomputed "
              f"for the new length", flush=True)
    merged.output, merged.experiment, merged.resume = str(path.parent.parent), path.parent.name, str(path)
    return merged, checkpoint


def run(args: argparse.Namespace, explicit: set[str], runtime: Runtime, argv: Sequence[str]) -> RunResult:
    """One training run from parsed arguments (resuming when asked)."""
    checkpoint = None
    if args.resume is not None:
        args, checkpoint = resolve_resume(args, explicit)
    args.experiment = args.experiment or default_experiment_name(args)
    trainer = Trainer(args, runtime, argv, resume_from=checkpoint)
    try:
        return trainer.fit()
    finally:
        runtime.stop_log_file()


# ---------------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------------
# The demo's settings (configs/demo.yaml spells out the same): a teacher on all of Fashion-MNIST, then a smaller
# student on a small labelled subset, alone and with DiffKD, over two seeds.
DEMO_DEFAULTS = {
    "dataset": "fashion-mnist", "teacher": "resnet14", "student": "resnet8", "method": "diffkd",
    "epochs": 5, "batch_size": 64, "lr": 0.1, "sched": "cosine", "weight_decay": 5e-4, "eval_interval": 5,
    "train_subset": 2000, "threads": 1, "demo_seeds": [0, 1], "demo_teacher_epochs": 1, "demo_teacher_subset": 24000,
}


def _apply_demo_defaults(args: argparse.Namespace, explicit: set[str]) -> None:
    for key, value in DEMO_DEFAULTS.items():
        if key not in explicit:
            setattr(args, key, value)


def cache_folder() -> Path:
    """Where the demo keeps its trained teachers: $DIFFKD_CACHE, else ~/.cache/diffkd."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffkd")


def _run_args(base: argparse.Namespace, **changes) -> argparse.Namespace:
    values = {**vars(base), "demo": False, "resume": None, "config": None}
    values.update(changes)
    return argparse.Namespace(**values)


def _demo_teacher(args: argparse.Namespace, folder: Path, runtime: Runtime, argv: Sequence[str]) -> tuple[Path, bool]:
    """The demo teacher's weight file, and whether it came from the cache (else it is trained now, method none,
    and cached).  The cache key covers every setting that shapes the teacher."""
    teacher_args = _run_args(args, method="none", student=args.teacher, teacher=None, teacher_ckpt=None,
                             epochs=args.demo_teacher_epochs, train_subset=args.demo_teacher_subset,
                             eval_interval=args.demo_teacher_epochs, seed=args.demo_seeds[0], output=str(folder),
                             experiment="teacher")
    recipe = {k: getattr(teacher_args, k) for k in ("dataset", "student", "epochs", "train_subset", "batch_size",
                                                    "lr", "opt", "momentum", "nesterov", "weight_decay", "sched",
                                                    "warmup_epochs", "min_lr", "seed", "max_steps")}
    key = hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:12]
    cached = cache_folder() / "teachers" / f"{args.dataset}-{args.teacher}-{key}.pth"
    if cached.is_file():
        runtime.log(f"== teacher {args.teacher}: reusing {cached} (delete it to train the teacher again)")
        return cached, True
    runtime.log(f"== teacher {args.teacher}: training it ({teacher_args.epochs} epoch(s)); it is cached as {cached}")
    result = run(teacher_args, set(), runtime, argv)
    if runtime.is_main:
        cached.parent.mkdir(parents=True, exist_ok=True)
        export_student(read_checkpoint(result.folder / "last.pth"), cached)
    runtime.barrier()
    return cached, False


def _mean_spread(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def run_demo(args: argparse.Namespace, runtime: Runtime, argv: Sequence[str]) -> str:
    """Teacher, then the student alone and with DiffKD for each seed; prints and returns the results table."""
    started = time.perf_counter()
    folder = Path(args.output) / (args.experiment or f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    check_output_folder(folder, resume=False)
    teacher_ckpt, reused = _demo_teacher(args, folder, runtime, argv)
    results: dict[str, list[RunResult]] = {"none": [], "diffkd": []}
    for seed in args.demo_seeds:
        for method, results_of_method in results.items():
            runtime.log(f"== student {args.student}, {'alone' if method == 'none' else 'with DiffKD'}, seed {seed}")
            teacher = dict(teacher=args.teacher, teacher_ckpt=str(teacher_ckpt)) if method == "diffkd" else dict(
                teacher=None, teacher_ckpt=None)
            run_args = _run_args(args, method=method, seed=seed, output=str(folder),
                                 experiment=f"{method}-seed{seed}", **teacher)
            results_of_method.append(run(run_args, set(), runtime, argv))
    alone = [r.last_top1 for r in results["none"]]
    distilled = [r.last_top1 for r in results["diffkd"]]
    teacher_images = args.demo_teacher_subset or "all"
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    lines = [
        f"Fashion-MNIST demo: test top-1 (%) after the last epoch, on {results['none'][0].test_images} test images",
        f"  teacher {args.teacher} ({teacher_images} training images, {args.demo_teacher_epochs} epoch(s))"
        f"{' [cached]' if reused else ''}: {results['diffkd'][0].teacher_top1:.2f}",
        f"  student {args.student} ({args.train_subset or 'all'} training images, {args.epochs} epochs), mean ± std "
        f"over seeds {', '.join(map(str, args.demo_seeds))}:",
        f"    alone        {_mean_spread(alone):>13}   per seed: {', '.join(f'{v:.2f}' for v in alone)}",
        f"    with DiffKD  {_mean_spread(distilled):>13}   per seed: {', '.join(f'{v:.2f}' for v in distilled)}",
        f"    difference   {statistics.mean(distilled) - statistics.mean(alone):>+13.2f}",
        f"  wall time {minutes} min {seconds:02d} s; every run's log, summary.csv and plots are in {folder}",
    ]
    table = "\n".join(lines)
    runtime.log(table)
    if runtime.is_main:
        _write_text(folder / "results.txt", table + "\n")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 on success; on bad input or a diverged run a one-line message and a non-zero code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime = None

    def report(message: str) -> None:  # once, from the main process
        if runtime is None or runtime.is_main:
            print(message, file=sys.stderr, flush=True)

    try:
        args, explicit = parse_args(argv)
        runtime = setup_runtime(args.device, args.threads)
        if args.demo:
            run_demo(args, runtime, argv)
        else:
            run(args, explicit, runtime, argv)
    except UsageError as error:
        report(f"error: {error}")
        return error.exit_code
    except KeyboardInterrupt:
        report("interrupted: the last completed epoch's checkpoint (last.pth) is intact; continue with --resume")
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
