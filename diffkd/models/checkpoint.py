"""Checkpoints: strict loading of benchmark / timm / our own files, and atomic saving in the benchmark's format.

Loading never falls back to ``strict=False`` silently: a teacher whose weights did not load is a random teacher,
and distilling from it wastes a whole run.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffkd.files import load_weights_file, save_atomically

# Where the weights sit inside a checkpoint file, in the order they are looked for: the benchmark's teachers
# ("model"), most training scripts ("state_dict"), and distillation runs that also store a teacher ("student").
WEIGHT_KEYS = ("model", "state_dict", "student")
# Prefixes that wrappers add to every key: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN_KEYS = 5


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` found: where the weights were and the file's scalar metadata."""

    path: str
    weights_key: str | None  # None for a raw state dict
    metadata: dict = field(default_factory=dict)  # e.g. {"epoch": 240, "accuracy": 79.42} in benchmark files
    missing: list[str] = field(default_factory=list)  # only with strict=False
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def describe_architecture(model: nn.Module) -> str:
    """A short human name: the zoo's or timm's architecture name and the class."""
    model = unwrap_model(model)
    name = getattr(model, "arch_name", None)
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if name is None and isinstance(pretrained_cfg, Mapping):
        name = pretrained_cfg.get("architecture")
    return f"{name} ({type(model).__name__})" if name else type(model).__name__


def _find_weights(content, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(content, Mapping):
        raise ValueError(f"checkpoint '{path}' holds a {type(content).__name__}, not a dict of weights")
    for key in WEIGHT_KEYS:
        if isinstance(content.get(key), Mapping):
            return dict(content[key]), key
    if content and all(isinstance(value, torch.Tensor) for value in content.values()):
        return dict(content), None
    found = ", ".join(repr(key) for key in list(content)[:10])
    raise ValueError(f"checkpoint '{path}' has no weights under {', '.join(map(repr, WEIGHT_KEYS))} and is not a "
                     f"plain state dict either; its top-level keys are: {found}")


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


def _metadata(content, weights_key: str | None) -> dict:
    """Scalar entries next to the weights (epoch, accuracy, ...), for logs."""
    if weights_key is None:
        return {}
    metadata = {}
    for key, value in content.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metadata[key] = value.item()
        elif isinstance(value, (bool, int, float, str)):
            metadata[key] = value
    return metadata


def _shown(items: list[str]) -> str:
    more = f", … ({len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else ""
    return ", ".join(items[:_SHOWN_KEYS]) + more


def _mismatch_message(path: Path, weights_key: str | None, model: nn.Module, expected: dict[str, torch.Tensor],
                      missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]]) -> str:
    where = f"weights under '{weights_key}'" if weights_key else "a plain state dict"
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_shown(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_shown(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + _shown(
            [f"{key} checkpoint {list(got)} vs model {list(want)}" for key, got, want in mismatched]))
    message = (f"checkpoint '{path}' ({where}) does not fit the model {describe_architecture(model)}: "
               + "; ".join(problems) + ". ")
    classifier = getattr(unwrap_model(model), "get_classifier", None)
    classifier_keys = set()
    if callable(classifier):
        classifier_params = {id(param) for param in classifier().parameters()}
        classifier_keys = {name for name, param in unwrap_model(model).named_parameters()
                           if id(param) in classifier_params}
    if mismatched and not missing and not unexpected and {key for key, _, _ in mismatched} <= classifier_keys:
        classes = mismatched[0][1][0]
        return message + (f"Only the classifier differs: the checkpoint was trained for {classes} classes; create "
                          f"the model with num_classes={classes}.")
    if unexpected and not missing and not mismatched:
        return message + (f"The checkpoint holds {len(unexpected)} more tensor(s) than the model: it was made for a "
                          f"deeper or larger variant of this architecture; check the model name.")
    if missing and not unexpected and not mismatched:
        return message + (f"The model has {len(missing)} tensor(s) the checkpoint lacks: the checkpoint was made for "
                          f"a shallower or smaller variant of this architecture; check the model name.")
    matching = len(expected) - len(missing) - len(mismatched)
    if matching < len(expected) / 2:
        return message + ("This checkpoint looks like it was made for a different architecture: check the model "
                          "name (the CIFAR zoo's names are case-sensitive, e.g. 'resnet8x4', 'wrn_40_2', "
                          "'MobileNetV2').")
    return message + "Check that the model name, num_classes and in_chans match the ones the checkpoint was made with."


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> CheckpointInfo:
    """Load weights into ``model`` from ``path``, strictly by default.

    Accepts ``{"model": state_dict, ...}`` (the CIFAR benchmark's format), ``{"state_dict": ...}``,
    ``{"student": ...}``, a raw state dict, or a ``.safetensors`` file; a ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefix on every key is removed.  Files are read with ``torch.load(weights_only=True)``.

    With ``strict=True`` any missing key, unexpected key or shape mismatch raises ValueError naming the file,
    the architecture and examples of each; BatchNorm's ``num_batches_tracked`` counters may be absent (old
    checkpoints lack them).  With ``strict=False`` the matching tensors are loaded and the rest is reported in
    the returned :class:`CheckpointInfo`.
    """
    path = Path(path)
    content = load_weights_file(path)
    state_dict, weights_key = _find_weights(content, path)
    state_dict = _strip_wrapper_prefixes(state_dict)
    target = unwrap_model(model)
    expected = target.state_dict()
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [(key, tuple(state_dict[key].shape), tuple(expected[key].shape)) for key in expected
                  if key in state_dict and state_dict[key].shape != expected[key].shape]
    if strict and (missing or unexpected or mismatched):
        raise ValueError(_mismatch_message(path, weights_key, model, expected, missing, unexpected, mismatched))
    mismatched_keys = {key for key, _, _ in mismatched}
    loadable = {key: value for key, value in state_dict.items() if key in expected and key not in mismatched_keys}
    # Every problem was found above; strict=False here only lets absent num_batches_tracked counters stay.
    target.load_state_dict(loadable, strict=False)
    return CheckpointInfo(path=str(path), weights_key=weights_key, metadata=_metadata(content, weights_key),
                          missing=missing, unexpected=unexpected, mismatched=sorted(mismatched_keys))


def _check_storable(value, where: str) -> None:
    """Refuse, at save time, what torch.load(weights_only=True) would refuse at load time."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_storable(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
        return
    raise ValueError(f"{where} has type {type(value).__name__}; checkpoints hold only tensors, numbers, strings, None "
                     f"and dicts/lists of them (so that they load with weights_only=True): convert it first")


def save_checkpoint_benchmark_format(model: nn.Module, path: str | os.PathLike, /, **extra) -> Path:
    """Write ``{"model": state_dict, **extra}`` to ``path`` atomically (temporary file, then ``os.replace``).

    The state dict is the unwrapped model's (no ``module.`` prefix), so the file loads into a bare model, here
    or in the benchmark's own code.  ``extra`` holds metadata such as ``epoch=240, accuracy=76.7``.
    """
    if "model" in extra:
        raise ValueError("save_checkpoint_benchmark_format stores the weights under 'model'; pass the other "
                         "entries under different names")
    for key, value in extra.items():
        _check_storable(value, f"extra entry {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically({"model": unwrap_model(model).state_dict(), **extra}, path)
    return path
