"""The divergence guard: a non-finite loss stops the run; fp16 steps the gradient scaler skipped are counted.

Everything is recorded on the device and read once per check (the loop checks on its progress-line steps and
before every checkpoint), so the host never waits for the device every step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffkd.train.errors import DivergedError

# fp16: the gradient scaler skips a step whose gradients overflowed and halves its scale.  This many skipped
# steps in a row (the scale divided by 2^25) means the run itself diverged.
MAX_SKIPPED_IN_A_ROW = 25


class DivergenceGuard:
    def __init__(self, scaler: torch.amp.GradScaler, device: torch.device, micro_batches_done: int,
                 skipped_total: int = 0):
        self.scaler = scaler
        self.skipped_total = skipped_total  # fp16 steps skipped over the whole run
        self._micro_counter = torch.full((), micro_batches_done, dtype=torch.int64, device=device)
        self._first_bad_micro = torch.full((), -1, dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped_in_a_row = torch.zeros((), dtype=torch.int64, device=device)

    def record_loss(self, loss: torch.Tensor) -> None:
        """Notes, on the device, the first micro-batch whose loss is not finite (fp16: the scaler handles those)."""
        self._micro_counter += 1
        if not self.scaler.is_enabled():
            bad = ~torch.isfinite(loss.detach())
            self._first_bad_micro = torch.where(bad & (self._first_bad_micro < 0), self._micro_counter,
                                                self._first_bad_micro)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step through the scaler, noting (on the device) whether fp16 skipped it."""
        if not self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        scale_before = self.scaler._scale.clone()  # the scale only drops when the step was skipped
        self.scaler.step(optimizer)
        self.scaler.update()
        skipped = (self.scaler._scale < scale_before).long()
        self._skipped += skipped
        self._skipped_in_a_row = (self._skipped_in_a_row + 1) * skipped

    def check(self, *, distributed: bool, steps_per_epoch: int, accum_steps: int, kept: str) -> int:
        """Synchronises once (with every process, when ``distributed``) and returns the fp16 steps skipped since
        the last check; raises DivergedError, saying that ``kept`` (the checkpoint left), when a loss was not finite
        or fp16 kept overflowing."""
        values = torch.stack([self._first_bad_micro, self._skipped, self._skipped_in_a_row]).double()
        if distributed:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        first_bad, skipped, in_a_row = (int(v) for v in values.tolist())
        self.skipped_total += skipped
        self._skipped.zero_()
        if first_bad >= 0:
            step = (first_bad - 1) // accum_steps
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            problem = f"the loss is not finite at epoch {epoch + 1}, step {step_in_epoch + 1}"
        elif in_a_row >= MAX_SKIPPED_IN_A_ROW:
            problem = f"fp16 overflowed in {in_a_row} steps in a row (the gradient scaler skipped them all)"
        else:
            return skipped
        raise DivergedError(
            f"{problem}; training stopped and {kept}. Start a new run (--experiment NAME) with a lower --lr or "
            f"--warmup-epochs, or without --amp / with --amp-dtype bfloat16: resuming with the same settings would "
            f"repeat the same steps")
