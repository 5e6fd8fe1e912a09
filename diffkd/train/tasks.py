"""What the loop needs to know about a task: moving a batch to the device, the per-batch training metrics, the
test-set evaluation and how its result reads in the log."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.train.runtime import Precision, Runtime, StopRequest


class EvaluationInterrupted(Exception):
    """A stop was requested during a test pass; nothing of the pass is kept."""


def move_images(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class ClassificationTask:
    """Images and class labels; top-1 / top-5 accuracy on the test set."""

    name = "classification"
    metric = "top1"  # the key of ``evaluate``'s result that picks best.pth (higher is better)

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
    @torch.no_grad()
    def evaluate(model: nn.Module, loader, runtime: Runtime, precision: Precision, channels_last: bool,
                 stop: StopRequest | None = None) -> dict:
        """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole loader, summed across processes.

        A requested stop ends the pass between batches (one process only: with several, every process must
        reach the final reduction, so the pass completes)."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-5, count
        try:
            for batch in loader:
                if stop is not None and stop.requested and not runtime.distributed:
                    raise EvaluationInterrupted
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
