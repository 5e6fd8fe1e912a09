"""Flags of ``python -m diffkd.train``, the YAML config overlay and the per-dataset training recipes.

Order of precedence: the dataset's recipe < ``-c FILE.yaml`` < the command line.  ``parse_args`` also returns
the names of the settings given explicitly (by the config or the command line): resuming and the demo need them.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from diffkd.data import DATASET_NAMES
from diffkd.data.recipes import DETECTION_DATASET_NAMES, SEGMENTATION_DATASET_NAMES
from diffkd.compression import COMPRESSIONS
from diffkd.losses import FEATURE_DISTANCES
from diffkd.methods import HEAD_SELECTIONS, LOGIT_DISTANCES, METHODS
from diffkd.modules import FEATURE_NORMS
from diffkd.schedule import TIMESTEP_STARTS
from diffkd.train.errors import UsageError
from diffkd.train.flag_effects import check_settings_take_effect
from diffkd.train.flag_values import (checkpoint_interval, decay_rate, experiment_name, learning_rate, momentum_value,
                                      non_negative_float, non_negative_int, path_text, positive_float, positive_int,
                                      seed_value)
from diffkd.train.tasks import TASK_NAMES
from kernels._common import BACKENDS

DENSE_DATASETS = {"detection": DETECTION_DATASET_NAMES, "segmentation": SEGMENTATION_DATASET_NAMES}
ALL_DATASETS = tuple(dict.fromkeys([*DATASET_NAMES, *DETECTION_DATASET_NAMES, *SEGMENTATION_DATASET_NAMES]))

# Flags that steer the command itself, not the run: a config file cannot set them.
COMMAND_ONLY = ("config", "resume", "help")
# Never stored as a run's settings: --max-steps caps one invocation only.
NOT_STORED = (*COMMAND_ONLY, "max_steps")
# Keys a run records in its args.yaml beside the flags (so that args.yaml still works as a config file).
RECORDED_ONLY = ("teacher_ckpt_sha256",)

# The optimisation recipe each dataset starts from; any value can be changed by a config or a flag.
# cifar100: recipe A1 of the paper; imagenet: recipe B1 of the paper; fashion-mnist: ours (small models, cosine).
# Detection and segmentation recipes are keyed "<task>:<dataset>": COCO and image/mask folders follow
# torchvision's reference recipes (poly decay replaced by cosine); the scene demos are ours, sized for a CPU.
RECIPES = {
    "cifar100": dict(epochs=240, batch_size=64, lr=0.05, nesterov=False, weight_decay=5e-4, decay_norm_bias=True,
                     sched="multistep", decay_milestones=[150, 180, 210]),
    "imagenet": dict(epochs=100, batch_size=256, lr=0.1, nesterov=True, weight_decay=1e-4, decay_norm_bias=False,
                     sched="step", decay_epochs=30),
    "fashion-mnist": dict(epochs=15, batch_size=64, lr=0.1, nesterov=False, weight_decay=5e-4, decay_norm_bias=True,
                          sched="cosine"),
    "detection:coco": dict(epochs=26, batch_size=16, lr=0.02, nesterov=False, weight_decay=1e-4,
                           decay_norm_bias=True, sched="multistep", decay_milestones=[16, 22]),
    "segmentation:segfolder": dict(epochs=30, batch_size=32, lr=0.02, nesterov=False, weight_decay=1e-4,
                                   decay_norm_bias=True, sched="cosine"),
    "detection:fashion-scenes": dict(epochs=12, batch_size=8, lr=0.02, nesterov=False, weight_decay=1e-4,
                                     decay_norm_bias=True, sched="cosine"),
    "segmentation:fashion-scenes": dict(epochs=12, batch_size=8, lr=0.02, nesterov=False, weight_decay=1e-4,
                                        decay_norm_bias=True, sched="cosine"),
}
# Recipe settings a dataset's recipe leaves alone.
RECIPE_FALLBACKS = dict(decay_milestones=[150, 180, 210], decay_epochs=30)
RECIPE_KEYS = tuple(dict.fromkeys(key for recipe in RECIPES.values() for key in recipe))

# Names other training scripts use for our settings (config keys): "did you mean" cannot guess these.
KNOWN_SYNONYMS = {
    "learning_rate": "lr", "base_lr": "lr", "batch": "batch_size", "num_epochs": "epochs", "max_epochs": "epochs",
    "optimizer": "opt", "wd": "weight_decay", "scheduler": "sched", "lr_scheduler": "sched",
    "lr_decay_epochs": "decay_milestones", "lr_decay_rate": "decay_rate", "model": "student",
    "model_s": "student", "model_t": "teacher", "path_t": "teacher_ckpt", "num_workers": "workers",
    "warmup": "warmup_epochs", "output_dir": "output", "data_path": "data_dir", "data": "data_dir",
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default when it has one worth showing and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """Every diffkd command's parser: whole flag names only (argparse's prefix matching would take a misspelt
    ``--epoch`` for ``--epochs`` and hide the typo) and an error in one line, with the nearest flag for a typo."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}{self._typo_hint(message)} (see {self.prog} --help)\n")

    def _typo_hint(self, message: str) -> str:
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for token in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(token.split("=")[0], flags, n=1)
            if token.startswith("--") and close:
                return f"; did you mean {close[0]}?"
        return ""


class _ConfigParser(ArgumentParser):
    """Parses the tokens made from a config file; an error names the file and raises instead of exiting."""

    config_path = ""

    def error(self, message: str):
        raise UsageError(f"config {self.config_path}: {message}")


def _recipe_help(key: str) -> str:
    values = ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items() if key in recipe)
    return f"(default: the dataset's recipe: {values})" if values else ""


def build_parser(*, suppress_defaults: bool = False, config_path: str | None = None) -> argparse.ArgumentParser:
    """The command line.  With ``suppress_defaults`` only the flags actually given appear in the result; with
    ``config_path`` the parser checks a config file's tokens and its errors name that file."""
    parser_class = _ConfigParser if config_path else ArgumentParser
    parser = parser_class(
        prog="python -m diffkd.train",
        description="Train a student alone (--method none, also for teachers) or distil it from a teacher "
                    "(kd, dist, mse, diffkd). With no arguments: the Fashion-MNIST demo (see the README).",
        formatter_class=HelpFormatter)
    if config_path:
        parser.config_path = config_path
    add = parser.add_argument
    add("-c", "--config", type=path_text,
        help="YAML file of defaults (keys: flag names with underscores); flags given here win")

    group = parser.add_argument_group("task and data")
    group.add_argument("--task", default="classification", choices=TASK_NAMES,
                       help="what the models predict: classes, boxes (torchvision detectors, distilled on every FPN "
                            "level) or class maps (DeepLabV3 / LR-ASPP, distilled on the class-score map)")
    group.add_argument("--dataset", default="fashion-mnist", choices=ALL_DATASETS,
                       help="dataset; also selects the augmentation and the default training recipe. Detection: "
                            "fashion-scenes (scenes of real Fashion-MNIST items) or coco (COCO-format folders); "
                            "segmentation: fashion-scenes or segfolder (images/ and masks/ folders)")
    group.add_argument("--data-dir", type=path_text,
                       help="dataset folder (Fashion-MNIST defaults to the Debian package's)")
    group.add_argument("--train-subset", type=positive_int,
                       help="train on a fixed, class-balanced subset of this many training images")
    group.add_argument("--val-subset", type=positive_int,
                       help="evaluate on a fixed subset of this many test images: the same images for every seed "
                            "and method")
    group.add_argument("--workers", type=non_negative_int,
                       help="data loader processes (default: 0 for in-memory datasets, up to 8 for ImageNet and "
                            "image folders)")
    group.add_argument("--image-size", type=positive_int,
                       help="fashion-scenes: the side of the scenes (default 128); coco: the side detectors "
                            "resize images to (e.g. 800); segfolder: the training crop")
    group.add_argument("--num-classes", type=positive_int,
                       help="segfolder: classes including the background (default: from its classes.txt)")

    group = parser.add_argument_group("models")
    group.add_argument("--student", help="student model: a CIFAR zoo name (resnet8x4, wrn_16_2, ...) or a timm name")
    group.add_argument("--teacher", help="teacher model, as --student")
    group.add_argument("--teacher-ckpt", type=path_text,
                       help="teacher weights (the CIFAR benchmark's {'model': ...} format and others; loaded "
                            "strictly), or 'demo' for the teacher the demo trained and cached")
    group.add_argument("--teacher-pretrained", action=argparse.BooleanOptionalAction, default=False,
                       help="teacher weights from the local timm / Hugging Face cache (never downloaded)")
    group.add_argument("--student-feature", help="module whose output is the student's feature map "
                                                 "(default: found by a dry forward pass)")
    group.add_argument("--teacher-feature", help="as --student-feature, for the teacher")
    group.add_argument("--fpn-channels", type=positive_int, default=256,
                       help="detection: channels of every FPN level, student and teacher alike")
    group.add_argument("--share-head", action=argparse.BooleanOptionalAction, default=False,
                       help="detection: one distillation head shared by all FPN levels instead of one per level "
                            "(the paper does not say which it used)")

    group = parser.add_argument_group("method (unset loss weights take the paper's values for the dataset)")
    group.add_argument("--method", default="diffkd", choices=METHODS,
                       help="none trains the student alone (teachers too); the others distil from --teacher")
    group.add_argument("--ce-weight", type=non_negative_float, help="weight of the cross-entropy on the labels")
    group.add_argument("--kd-weight", type=non_negative_float,
                       help="weight of the KD / DIST / MSE term, or of each DiffKD head's KD term")
    group.add_argument("--kd-temperature", type=positive_float, help="temperature of KL and DIST")
    group.add_argument("--dist-beta", type=non_negative_float, help="DIST inter-class weight")
    group.add_argument("--dist-gamma", type=non_negative_float, help="DIST intra-class weight")
    group.add_argument("--diffusion-weight", type=non_negative_float, help="DiffKD diffusion-loss weight")
    group.add_argument("--ae-weight", type=non_negative_float, help="DiffKD autoencoder-loss weight")
    group.add_argument("--heads", choices=tuple(HEAD_SELECTIONS), help="DiffKD heads (default both)")
    group.add_argument("--ae-channels", type=non_negative_int,
                       help="DiffKD feature-head autoencoder width, 0 for none (default: 0 on CIFAR-100 and "
                            "Fashion-MNIST, 1024 on ImageNet)")
    group.add_argument("--compression", choices=(*COMPRESSIONS, "none"),
                       help="DiffKD feature head: how the teacher feature is compressed to --ae-channels: ae (the "
                            "paper's linear autoencoder), pca (fitted on teacher features of the first training "
                            "images), random (a fixed random orthogonal projection), none (default: ae when "
                            "--ae-channels > 0, else none)")
    group.add_argument("--feature-distance", choices=FEATURE_DISTANCES,
                       help="DiffKD feature head's KD distance: mse (default, the paper's), cosine or pearson")
    group.add_argument("--nfe", type=positive_int, help="DiffKD denoising steps (default 5)")
    group.add_argument("--anm", action=argparse.BooleanOptionalAction,
                       help="DiffKD adaptive noise matching (default on; --no-anm is the ablation)")
    group.add_argument("--logit-kd-weight", type=non_negative_float,
                       help="DiffKD with --heads feature: weight of plain KD (KL) on the logits beside it (default 0)")
    group.add_argument("--logit-kd-temperature", type=float, help="its temperature τ (default 4, the KD recipe's)")
    group.add_argument("--logit-distance", choices=LOGIT_DISTANCES,
                       help="DiffKD logit-head distance: kl, or dist for the paper's DiffKD† (default kl)")
    group.add_argument("--feature-norm", choices=FEATURE_NORMS,
                       help="mse and DiffKD feature heads: channel standardises each channel of the (denoised) student "
                            "and teacher maps before the distance, PKD-style (the diffusion model still learns the raw "
                            "teacher maps); none is the paper's raw distance (default: channel for detection, none "
                            "elsewhere)")
    group.add_argument("--timestep-start", choices=TIMESTEP_STARTS,
                       help="DDIM grid: the official code's (default) or the paper's start at t = 500")
    group.add_argument("--backend", choices=BACKENDS,
                       help="DiffKD kernels: torch (PyTorch ops), triton (the fused Triton kernels; needs a CUDA "
                            "GPU), auto (default: the Triton kernels only inside CUDA-graph capture, PyTorch "
                            "otherwise, where each is faster)")

    group = parser.add_argument_group("optimisation (unset values follow the dataset's recipe)")
    group.add_argument("--epochs", type=positive_int, help="training epochs " + _recipe_help("epochs"))
    group.add_argument("-b", "--batch-size", type=positive_int,
                       help="global batch of one optimizer step, over all processes and accumulation steps "
                            + _recipe_help("batch_size"))
    group.add_argument("--lr", type=learning_rate, help="peak learning rate " + _recipe_help("lr"))
    group.add_argument("--opt", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    group.add_argument("--momentum", type=momentum_value, default=0.9, help="SGD momentum")
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                       help="Nesterov momentum " + _recipe_help("nesterov"))
    group.add_argument("--weight-decay", type=non_negative_float,
                       help="weight decay " + _recipe_help("weight_decay"))
    group.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction, default=None,
                       help="apply weight decay to normalisation weights and biases "
                            + _recipe_help("decay_norm_bias"))
    group.add_argument("--sched", choices=("multistep", "step", "cosine", "constant"),
                       help="learning-rate schedule after the warm-up " + _recipe_help("sched"))
    group.add_argument("--decay-milestones", type=positive_int, nargs="+",
                       help="multistep: epochs at which the LR is multiplied by --decay-rate "
                            "(default: 150 180 210)")
    group.add_argument("--decay-epochs", type=positive_int,
                       help="step: the LR is multiplied by --decay-rate every this many epochs (default: 30)")
    group.add_argument("--decay-rate", type=decay_rate, default=0.1, help="step / multistep: LR factor at each decay")
    group.add_argument("--min-lr", type=non_negative_float, default=0.0, help="cosine: the final LR")
    group.add_argument("--warmup-epochs", type=non_negative_float, default=0.0,
                       help="linear LR warm-up from 0, per step (fractions allowed)")
    group.add_argument("--grad-accum-steps", type=positive_int, default=1,
                       help="micro-batches accumulated into one optimizer step")

    group = parser.add_argument_group("runtime")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                       help="mixed precision (autocast); the DDIM constants stay float32. On a CPU, bfloat16 only "
                            "where it is native (AVX-512 BF16 or AMX), else float32")
    group.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16",
                       help="float16 adds a gradient scaler; its skipped steps are counted, not fatal")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="channels-last memory format for the models and images")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    group.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                       help="replay each DiffKD head's forward and backward from CUDA graphs, where the fused Triton "
                            "kernels pay off; each new shape is checked once against an eager step and falls back "
                            "to eager with a warning if they disagree. auto: on for CUDA runs, off on a CPU")
    group.add_argument("--threads", type=positive_int,
                       help="CPU threads per process (default: $OMP_NUM_THREADS, else every core available)")
    group.add_argument("--seed", type=seed_value, default=0,
                       help="initialisation, data order, augmentation and DiffKD noise; same seed, same run")

    group = parser.add_argument_group("output")
    group.add_argument("--output", type=path_text, default="output", help="folder holding the experiment folders")
    group.add_argument("--experiment", type=experiment_name,
                       help="experiment folder name inside --output (default: <dataset>-<method>-<models>-seed<seed>)")
    group.add_argument("--resume", nargs="?", const="", metavar="PATH",
                       help="continue a run exactly where it stopped: its experiment folder or checkpoint file "
                            "(alone: <output>/<experiment>); with --demo, a demo folder (alone: the latest)")
    group.add_argument("--max-steps", type=positive_int,
                       help="stop this invocation after this many optimizer steps (smoke runs): the run is "
                            "checkpointed where it stands, its student tested, and --resume continues it")
    group.add_argument("--checkpoint-interval", type=checkpoint_interval, default="10min",
                       help="also checkpoint mid-epoch, every N optimizer steps (e.g. 500) or every duration "
                            "(e.g. 600s, 10min, 1h); epoch ends and Ctrl-C always checkpoint")
    group.add_argument("--log-interval", type=positive_int, default=50, help="optimizer steps between progress lines")
    group.add_argument("--eval-interval", type=positive_int, default=1,
                       help="epochs between test-set evaluations (the last epoch is always evaluated)")
    group.add_argument("--eval-batch-size", type=positive_int, help="per process (default: twice the training one)")

    group = parser.add_argument_group("demo (the default when no arguments are given)")
    group.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                       help="teacher, then the student alone and with DiffKD over --demo-seeds, and a table")
    group.add_argument("--demo-seeds", type=seed_value, nargs="+", help="seeds of the student runs")
    group.add_argument("--demo-teacher-epochs", type=positive_int, help="epochs of the demo's teacher")
    group.add_argument("--demo-teacher-subset", type=positive_int,
                       help="training images of the demo's teacher (default: all)")
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def _unknown_key_hint(key: str, known: Sequence[str]) -> str:
    normalised = str(key).replace("-", "_")
    if normalised in KNOWN_SYNONYMS:
        return f" Did you mean {KNOWN_SYNONYMS[normalised]!r}?"
    hint = difflib.get_close_matches(normalised, list(known), n=1)
    return f" Did you mean {hint[0]!r}?" if hint else ""


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
        if key in RECORDED_ONLY:
            continue
        if key not in actions:
            raise UsageError(f"config {path}: unknown key {key!r}.{_unknown_key_hint(key, actions)} Keys are the "
                             f"flag names with underscores (see python -m diffkd.train --help).")
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
    return tokens, set(content) - set(RECORDED_ONLY)


# The demo's settings (configs/demo.yaml spells out the same): a teacher on all of Fashion-MNIST, then a smaller
# student on a small labelled subset, alone and with DiffKD, over two seeds.
# The detection and segmentation demos (configs/detection/demo.yaml, configs/segmentation/demo.yaml): 96-pixel
# scenes, a teacher on all 2,000 training scenes, students on 500, narrow models and AdamW, sized for a CPU.
_SCENE_DEMO = {"dataset": "fashion-scenes", "method": "diffkd", "image_size": 96, "epochs": 8, "batch_size": 16,
               "opt": "adamw", "lr": 1e-3, "warmup_epochs": 0.2, "sched": "cosine", "weight_decay": 1e-4,
               "eval_interval": 8, "train_subset": 500, "threads": 1, "demo_seeds": [0],
               "demo_teacher_epochs": 2, "demo_teacher_subset": 2000}
DEMO_DEFAULTS = {
    "classification": {
        "dataset": "fashion-mnist", "teacher": "resnet14", "student": "resnet8", "method": "diffkd",
        "epochs": 5, "batch_size": 64, "lr": 0.1, "sched": "cosine", "weight_decay": 5e-4, "eval_interval": 5,
        "train_subset": 2000, "threads": 1, "demo_seeds": [0, 1], "demo_teacher_epochs": 1,
        "demo_teacher_subset": 24000, "amp": True},
    "detection": {**_SCENE_DEMO, "teacher": "retinanet_resnet34_fpn", "student": "retinanet_resnet18_fpn",
                  "fpn_channels": 64},
    "segmentation": {**_SCENE_DEMO, "teacher": "deeplabv3_mobilenet_v3_large",
                     "student": "lraspp_mobilenet_v3_large", "demo_teacher_epochs": 4},
}


def check_task_and_dataset(task: str, dataset: str) -> None:
    """Refuses a --dataset that has no targets for --task."""
    fitting = DATASET_NAMES if task == "classification" else DENSE_DATASETS[task]
    if dataset in fitting:
        return
    dense_tasks = [name for name, names in DENSE_DATASETS.items() if dataset in names]
    hint = (f"--dataset {dataset} holds {' and '.join(dense_tasks)} targets: add --task {dense_tasks[0]}"
            if task == "classification" else f"--task {task} needs one of the datasets {', '.join(fitting)}")
    raise UsageError(f"--task {task} does not fit --dataset {dataset}; {hint}")


def recipe_key(task: str, dataset: str) -> str:
    return dataset if task == "classification" else f"{task}:{dataset}"


def apply_recipe(args: argparse.Namespace) -> None:
    """Fills the optimisation settings left unset with the recipe of the task's dataset."""
    recipe = {**RECIPE_FALLBACKS, **RECIPES[recipe_key(args.task, args.dataset)]}
    for key in (*RECIPE_KEYS, *RECIPE_FALLBACKS):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])


def parse_args(argv: Sequence[str], notes: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Recipe defaults, overlaid by the config file, overlaid by the command line; no arguments means --demo.

    Warnings (settings a config sets to no effect, ``--lr 0``) go to ``notes`` when given (the caller logs them
    into the run's log), else to stderr."""
    argv = list(argv) or ["--demo"]
    parser = build_parser()
    parser.parse_args(argv)  # --help (with the defaults shown) and errors in the flags, before the config is read
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    explicit = set(given) - set(COMMAND_ONLY)
    config_tokens: list[str] = []
    config_values: dict[str, object] = {}
    if given.get("config"):
        config_tokens, config_keys = _config_tokens(given["config"], parser)
        explicit |= config_keys
        config_values = vars(build_parser(config_path=given["config"], suppress_defaults=True)
                             .parse_args(config_tokens))
    args = parser.parse_args(config_tokens + argv)
    if args.demo:
        for key, value in DEMO_DEFAULTS[args.task].items():
            if key not in explicit:
                setattr(args, key, value)
    check_task_and_dataset(args.task, args.dataset)
    apply_recipe(args)
    if args.resume is None:  # a resumed run's settings are its saved ones, checked when it started
        command_line = set(given) - set(COMMAND_ONLY)
        # A run's args.yaml records every resolved setting, the other methods' included: reused as a config it
        # sets them by design, so only hand-written configs are checked.
        from_config = {} if Path(given.get("config") or "").name == "args.yaml" else {
            key: value for key, value in config_values.items() if key not in command_line}
        warnings = check_settings_take_effect(args, command_line, from_config, build_parser().parse_args([]))
        if notes is None:
            for warning in warnings:
                print(warning, file=sys.stderr, flush=True)
        else:
            notes.extend(warnings)
    return args, explicit
