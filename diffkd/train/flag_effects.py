"""Settings that do nothing in the configuration chosen: refused when typed on the command line, warned about when
a config file sets them (see ``_NO_EFFECT_RULES`` for why the two differ)."""
from __future__ import annotations

import argparse

from diffkd.data import DATASET_NAMES
from diffkd.train.errors import UsageError

# Settings that do nothing in some configurations: (settings, "does nothing here?", why).  Given on the command line
# they are refused: the user typed them for this run, so a silent no-op hides a mistake (``--method kd --nfe 3``
# meant DiffKD).  Set by a config file they are only warned about, and only when they differ from the default:
# configs, args.yaml included, legitimately spell out one set of values for several methods and optimizers.
_DIFFKD_SETTINGS = ("diffusion_weight", "ae_weight", "heads", "ae_channels", "nfe", "anm", "logit_distance",
                    "timestep_start", "backend", "cuda_graph", "kernel_size", "compression", "feature_distance",
                    "logit_kd_weight", "logit_kd_temperature")
_NO_EFFECT_RULES = (
    (("teacher", "teacher_ckpt", "teacher_pretrained", "teacher_feature", "kd_weight"),
     lambda a: a.method == "none" and not a.demo,
     lambda a: "--method none trains the student alone, without a teacher; pick a distillation method with "
               "--method kd|dist|mse|diffkd"),
    (_DIFFKD_SETTINGS, lambda a: a.method != "diffkd", lambda a: f"it is a DiffKD setting and --method is {a.method}"),
    (("kd_temperature",), lambda a: a.method in ("none", "mse"),
     lambda a: f"--method {a.method} compares no class probabilities"),
    (("dist_beta", "dist_gamma"), lambda a: a.method != "dist" and not (a.method == "diffkd"
                                                                        and a.logit_distance == "dist"),
     lambda a: "it weights DIST, which only --method dist and --method diffkd --logit-distance dist use"),
    (("student_feature", "feature_norm"), lambda a: a.method in ("none", "kd", "dist"),
     lambda a: f"--method {a.method} distils no feature map (mse and diffkd do)"),
    (("image_size",), lambda a: a.dataset in DATASET_NAMES,
     lambda a: f"{a.dataset} images keep their own size; it applies to fashion-scenes, coco and segfolder"),
    (("num_classes",), lambda a: a.dataset != "segfolder",
     lambda a: f"{a.dataset} has a fixed set of classes; it applies to --dataset segfolder"),
    (("fpn_channels", "share_head"), lambda a: a.task != "detection",
     lambda a: f"it shapes the detectors' FPN and --task is {a.task}"),
    (("momentum", "nesterov"), lambda a: a.opt != "sgd", lambda a: f"it applies to --opt sgd, not {a.opt}"),
    (("decay_milestones",), lambda a: a.sched != "multistep",
     lambda a: f"it applies to --sched multistep and the schedule is {a.sched}"),
    (("decay_epochs",), lambda a: a.sched != "step", lambda a: f"it applies to --sched step and the schedule is "
                                                               f"{a.sched}"),
    (("decay_rate",), lambda a: a.sched not in ("step", "multistep"),
     lambda a: f"it applies to --sched step / multistep and the schedule is {a.sched}"),
    (("min_lr",), lambda a: a.sched != "cosine", lambda a: f"it applies to --sched cosine and the schedule is "
                                                           f"{a.sched}"),
    (("amp_dtype",), lambda a: not a.amp, lambda a: "mixed precision is off; add --amp"),
    (("demo_seeds", "demo_teacher_epochs", "demo_teacher_subset"), lambda a: not a.demo,
     lambda a: "it applies to --demo only"),
    (("seed",), lambda a: a.demo, lambda a: "the demo's runs take their seeds from --demo-seeds"),
    (("method",), lambda a: a.demo and a.method != "diffkd",
     lambda a: "the demo always trains the student alone and with DiffKD"),
    (("teacher_ckpt",), lambda a: a.demo, lambda a: "the demo trains (or reuses from its cache) its own teacher"),
)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_settings_take_effect(args: argparse.Namespace, command_line: set[str], config: dict[str, object],
                               defaults: argparse.Namespace) -> list[str]:
    """Refuses a setting given on the command line that does nothing in this configuration; returns warnings (one
    line for all the config's) for the ones a config file sets to a value other than the default (see
    ``_NO_EFFECT_RULES`` for why the two differ)."""
    unused_in_config = []
    for keys, has_no_effect, why in _NO_EFFECT_RULES:
        present = [key for key in keys if hasattr(args, key)]
        if not present or not has_no_effect(args):
            continue
        for key in present:
            if key in command_line:
                raise UsageError(f"{_flag(key)} has no effect here: {why(args)}. Drop {_flag(key)} (nothing was "
                                 f"written)")
            if key in config and getattr(args, key) != getattr(defaults, key, None):
                unused_in_config.append(f"{key} ({why(args)})")
    warnings = [f"warning: the config sets what has no effect here: {'; '.join(unused_in_config)}"] \
        if unused_in_config else []
    if args.lr == 0:  # no recipe sets 0: it was asked for
        warnings.append("warning: --lr 0: the optimizer will not change any weight (only BatchNorm statistics "
                        "move); this is a check, not training")
    return warnings
