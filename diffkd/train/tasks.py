"""What the loop needs to know about a task: building its data and models, moving a batch to the device, the
per-batch training metrics, the test-set evaluation and how its result reads in the log.

Classification lives here; detection and segmentation in ``dense``.  ``task_of(args)`` picks one.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.train.build import Data, build_data, build_model, create_classifier
from diffkd.train.errors import UsageError
from diffkd.train.runtime import Precision, Runtime, StopRequest


class EvaluationInterrupted(Exception):
    """A stop was requested during a test pass; nothing of the pass is kept."""


def stoppable(loader, runtime: Runtime, stop: StopRequest | None):
    """The loader's batches, ending the pass with EvaluationInterrupted when a stop is requested (one process
    only: with several, every process must reach the final reduction, so the pass completes)."""
    for batch in loader:
        if stop is not None and stop.requested and not runtime.distributed:
            raise EvaluationInterrupted
        yield batch


def move_images(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class ClassificationTask:
    """Images and class labels; top-1 / top-5 accuracy on the test set."""

    name = "classification"
    metric = "top1"  # the key of ``evaluate``'s result that picks best.pth (higher is better)
    metric_label = "top-1"
    task_loss = "ce_loss"  # the task's own loss term, shown on progress lines

    @staticmethod
    def build_data(args: argparse.Namespace, runtime: Runtime, *, test_only: bool = False) -> Data:
        return build_data(args, runtime, test_only=test_only)

    @staticmethod
    def build_model(args: argparse.Namespace, info: dict, runtime: Runtime) -> nn.Module:
        return build_model(args, info, runtime)

    @staticmethod
    def create_student(name: str, info: dict, checkpoint: str | None = None, *, args=None) -> nn.Module:
        """The model ``name`` for the data ``info`` describes, with the weights of ``checkpoint`` (loaded strictly)
        or random ones."""
        return create_classifier(name, "model", info, checkpoint=checkpoint)

    @staticmethod
    def to_device(batch, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch
        return move_images(images, device, channels_last), targets.to(device, non_blocking=True)

    @staticmethod
    def batch_size(targets: torch.Tensor) -> int:
        return targets.shape[0]

    @staticmethod
    def train_metrics(out: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch metrics computed on the device (no synchronisation)."""
        return {"top1": (out["logits"].detach().argmax(1) == targets).float().mean() * 100}

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%"

    @staticmethod
    def near_chance(metrics: dict, info: dict) -> str | None:
        """A warning when a teacher's result is close to guessing (its weights or the dataset are wrong)."""
        chance = 100 / info["num_classes"]
        if metrics["top1"] < 2 * chance:
            return (f"warning: the teacher is near chance level ({chance:.1f}%): are --teacher-ckpt and --dataset "
                    f"right?")
        return None

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, loader, runtime: Runtime, precision: Precision, channels_last: bool,
                 stop: StopRequest | None = None) -> dict:
        """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole loader, summed across processes."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-5, count
        try:
            for batch in stoppable(loader, runtime, stop):
                images, targets = ClassificationTask.to_device(batch, runtime.device, channels_last)
                with precision.autocast():
                    logits = model(images)
                logits = logits.float()
                hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
                totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                                       hits.any(dim=1).sum(),
                                       torch.tensor(targets.numel(), device=runtime.device)]).double()
        finally:
            model.train(was_training)
        loss_sum, top1, top5, count = runtime.all_reduce_sum(totals).tolist()
        return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss_sum / count}


TASK_NAMES = ("classification", "detection", "segmentation")


def task_of(name: str):
    """The task object for --task NAME."""
    if name == "classification":
        return ClassificationTask
    if name in ("detection", "segmentation"):
        from diffkd.train.dense import DetectionTask, SegmentationTask  # dense imports this module
        return DetectionTask if name == "detection" else SegmentationTask
    raise UsageError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
