"""Training checkpoints: what they hold, random-number states, reading them back, exporting the student.

A checkpoint records a run's exact position: completed epochs, optimizer steps into the next epoch, the epoch's
running metric sums, every random stream of every process, and the model, optimizer, LR-schedule and gradient-scaler
states.  Checkpoints are taken only between optimizer steps (a stop requested during gradient accumulation waits
for the step to finish), so no partial gradient is ever stored.  Files are written atomically (diffkd.files).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from diffkd.files import load_weights_file, save_atomically
from diffkd.train.errors import UsageError
from diffkd.train.tasks import task_of

CHECKPOINT_FORMAT = "diffkd.train"
CHECKPOINT_VERSION = 2
# Version 1 (epoch ends only) still loads: its position is the start of an epoch.
READABLE_VERSIONS = (1, 2)


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


def load_file(path: Path):
    """A checkpoint file's content, or a UsageError that names the file and the fix."""
    try:
        return load_weights_file(path)
    except FileNotFoundError:
        raise UsageError(f"no checkpoint at {path}") from None
    except ValueError as error:
        raise UsageError(str(error)) from None


def as_training_checkpoint(content, path: Path, *, required: bool = True) -> dict | None:
    """``content`` if it is a training checkpoint of diffkd; otherwise None, or with ``required`` a UsageError
    saying what the file is instead."""
    if not (isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT):
        if not required:
            return None
        keys = ", ".join(map(repr, list(content)[:8])) if isinstance(content, dict) else type(content).__name__
        raise UsageError(f"{path} is not a diffkd training checkpoint (it holds {keys}); --resume and diffkd.eval "
                         f"take the last.pth / best.pth of a diffkd run. For a teacher's weights use --teacher-ckpt")
    if content.get("version") not in READABLE_VERSIONS:
        raise UsageError(f"{path} has checkpoint version {content.get('version')!r}; this diffkd reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    content.setdefault("step_in_epoch", 0)
    for old_name, name in (("best_top1", "best"), ("teacher_top1", "teacher")):  # version 1 names
        if old_name in content:
            content.setdefault(name, content[old_name])
    return content


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint written by diffkd, or a clear UsageError."""
    return as_training_checkpoint(load_file(path), path)


def describe_position(checkpoint: dict) -> str:
    epoch, step = checkpoint["epoch"], checkpoint["step_in_epoch"]
    return f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"


def export_student(checkpoint: dict, path: Path) -> None:
    """The student of a training checkpoint alone, in the CIFAR benchmark's format: ``{"model": state_dict}``
    plus ``epoch`` (completed epochs), ``accuracy`` (the last test value of the task's metric: top-1, mAP or mIoU),
    ``arch`` (the model name), ``dataset`` and ``task`` (read back by ``python -m diffkd.eval``); written atomically."""
    key = "val_" + task_of(checkpoint["args"].get("task", "classification")).metric
    evaluated = [row[key] for row in checkpoint["history"] if key in row]
    content = {"model": checkpoint["student"], "epoch": checkpoint["epoch"],
               "accuracy": evaluated[-1] if evaluated else float("nan"), "arch": checkpoint["args"]["student"],
               "dataset": checkpoint["args"]["dataset"], "task": checkpoint["args"].get("task", "classification")}
    save_atomically(content, path)
