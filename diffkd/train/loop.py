"""The training loop of one run: steps, progress lines, lazy finiteness checks, checkpoints, evaluation.

Between optimizer steps the loop reaches *safe points*, where it may checkpoint (every ``--checkpoint-interval``,
at epoch ends, on a stop request and at ``--max-steps``).  With one process every step is a safe point; with
several, the processes agree on time-based checkpoints and stop requests only at the progress-line steps
(``--log-interval``), the only steps where the loop synchronises the host with the device anyway.  The same
steps check, lazily, that the loss stayed finite; so does every checkpoint before it is written, so a checkpoint
never holds a diverged model.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from diffkd.train.build import build_optimizer, graph_heads, lr_factor_schedule
from diffkd.train.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, capture_rng_state, describe_position,
                                     restore_rng_state)
from diffkd.train.flag_values import interval_seconds_or_steps
from diffkd.train.errors import RunInterrupted, UsageError
from diffkd.train.guard import DivergenceGuard
from diffkd.train.run_folder import RunFolder, run_title, stored_args
from diffkd.train.runtime import Precision, Runtime, StopRequest, environment_report
from diffkd.train.tasks import EvaluationInterrupted, task_of
from diffkd.files import save_atomically
from diffkd.graphs import CUDAGraphHead


@dataclass(frozen=True)
class RunResult:
    folder: RunFolder
    last: float  # the last test value of the task's metric: after the last epoch, or where --max-steps stopped
    best: float
    best_epoch: int
    teacher: float | None
    test_images: int
    finished: bool  # all epochs done


class EpochAccumulator:
    """Running sums of one epoch's training metrics, on the device (no synchronisation per step)."""

    def __init__(self, device: torch.device, state: dict | None = None):
        state = state or {}
        self.sums: dict[str, torch.Tensor] = {k: v.to(device) for k, v in state.get("sums", {}).items()}
        self.seen: int = state.get("seen", 0)
        self.elapsed_s: float = state.get("elapsed_s", 0.0)
        self.start_lr: float | None = state.get("start_lr")
        self.skipped_steps: int = state.get("skipped_steps", 0)  # fp16 steps the gradient scaler skipped

    def add(self, out: dict, batch_size: int) -> None:
        self.seen += batch_size
        for key, value in out.items():
            if key != "logits":
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float() * batch_size

    def state(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "seen": self.seen, "elapsed_s": self.elapsed_s,
                "start_lr": self.start_lr, "skipped_steps": self.skipped_steps}

    def means(self, runtime: Runtime) -> dict:
        keys = sorted(self.sums)
        totals = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.seen), device=runtime.device)])
        totals = runtime.all_reduce_sum(totals.double()).tolist()
        return {f"train_{k}": v / totals[-1] for k, v in zip(keys, totals)} | {"images": int(totals[-1])}


class Trainer:
    """One run: builds it from its settings (or a checkpoint), trains, evaluates and checkpoints it."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, folder: RunFolder, argv: Sequence[str],
                 checkpoint: dict | None = None, stop: StopRequest | None = None):
        self.args, self.runtime, self.folder = args, runtime, folder
        self.stop = stop or StopRequest()
        self.task = task_of(args.task)
        self.data = self.task.build_data(args, runtime)
        self.model = self.task.build_model(args, self.data.info, runtime)
        self.model.to(runtime.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        graph_heads(self.model, args.cuda_graph, runtime.device, runtime.log)
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype] if args.amp else None
        self.precision = Precision(runtime.device.type, amp_dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp_dtype == torch.float16)
        self.optimizer = build_optimizer(args, self.model)
        self.steps_per_epoch = self.data.batches_per_epoch // args.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise UsageError(f"an epoch has {self.data.batches_per_epoch} batches, fewer than --grad-accum-steps "
                             f"{args.grad_accum_steps}: use fewer accumulation steps or more data")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_factor_schedule(args, self.steps_per_epoch))
        self.interval_s, self.interval_steps = interval_seconds_or_steps(args.checkpoint_interval)
        self.history: list[dict] = []
        self.epoch = self.step_in_epoch = self.global_step = 0  # position: completed epochs, steps into the next
        self.best, self.best_epoch = -1.0, 0  # the best test value of the task's metric, and its epoch
        self.teacher_value: float | None = None
        self.accumulator = EpochAccumulator(runtime.device)
        self.steps_this_invocation = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        elif runtime.distributed:  # each process draws its own DiffKD noise; one process stays at --seed itself
            torch.manual_seed(args.seed + runtime.rank)
        self.guard = DivergenceGuard(self.scaler, runtime.device, self.global_step * args.grad_accum_steps,
                                     skipped_total=checkpoint.get("skipped_steps", 0) if checkpoint else 0)
        self.last_checkpoint_time, self.last_checkpoint_step = time.monotonic(), self.global_step
        self.ddp_model = (nn.parallel.DistributedDataParallel(self.model, device_ids=[runtime.device.index]
                                                              if runtime.device.type == "cuda" else None)
                          if runtime.distributed else self.model)
        runtime.barrier()
        if runtime.is_main:
            note = f"resumed at {describe_position(checkpoint)}" if checkpoint is not None else ""
            folder.start(args, environment_report(runtime, argv), note)
            runtime.start_log_file(folder.path / "log.txt")
        self._describe()

    # ---- start-up ------------------------------------------------------------------------------------------
    def _describe(self) -> None:
        args, data, log = self.args, self.data, self.runtime.log
        role = "student" if self.model.teacher is not None else "model"
        parameters = sum(p.numel() for p in self.model.student.parameters())
        log(f"run {self.folder}: {args.method} on {args.dataset} ({data.train_size} training / {data.val_size} test "
            f"images), {self.runtime.world_size} process(es) on {self.runtime.device.type}")
        extra = (f"; extra training-time parameters (heads): {self.model.extra_parameter_count() / 1e6:.3f} M"
                 if self.model.heads else "")
        log(f"{role} {args.student}: {parameters / 1e6:.3f} M parameters{extra}")
        log(f"batch {args.batch_size} = {self.runtime.world_size} process(es) × {data.micro_batch} × "
            f"{args.grad_accum_steps} accumulation step(s); {self.steps_per_epoch} steps per epoch; {args.opt} "
            f"lr {args.lr} ({args.sched}), weight decay {args.weight_decay}"
            f"{', AMP ' + args.amp_dtype if args.amp else ''}")
        dropped = data.batches_per_epoch % args.grad_accum_steps
        if dropped:
            log(f"note: the last {dropped} batch(es) of each epoch do not fill an accumulation step and are skipped")

    def measure_teacher(self) -> None:
        if self.model.teacher is None or self.teacher_value is not None:
            return
        metrics = self.task.evaluate(self.model.teacher, self.data.val_loader, self.runtime, self.precision,
                                     self.args.channels_last, self.stop)
        self.teacher_value = metrics[self.task.metric]
        self.runtime.log(f"teacher {self.args.teacher}: {self.task.describe(metrics)} on {self.data.val_size} test "
                         f"images")
        warning = self.task.near_chance(metrics, self.data.info)
        if warning:
            self.runtime.log(warning)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict]:
        state = capture_rng_state()
        if not self.runtime.distributed:
            return [state]
        states: list = [None] * self.runtime.world_size
        dist.all_gather_object(states, state)
        return states

    def _save(self, *, is_best: bool = False) -> None:
        """Checkpoints the current position (every process takes part: the RNG states are gathered)."""
        self._check_finite()
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "args": stored_args(self.args),
            "student": self.model.student.state_dict(), "heads": self.model.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": self._gather_rng(), "history": self.history,
            "epoch_state": self.accumulator.state(), "best": self.best, "best_epoch": self.best_epoch,
            "teacher": self.teacher_value, "skipped_steps": self.guard.skipped_total,
            "test_images": self.data.val_size,
        }
        self.last_checkpoint_time = time.monotonic()
        self.last_checkpoint_step = self.global_step
        if not self.runtime.is_main:
            return
        save_atomically(checkpoint, self.folder.last)
        if is_best:
            save_atomically(checkpoint, self.folder.best)

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
        self.epoch, self.step_in_epoch = checkpoint["epoch"], checkpoint["step_in_epoch"]
        self.global_step = checkpoint["global_step"]
        self.history = list(checkpoint["history"])
        self.accumulator = EpochAccumulator(self.runtime.device, checkpoint.get("epoch_state"))
        self.best, self.best_epoch = checkpoint["best"], checkpoint["best_epoch"]
        self.teacher_value = checkpoint["teacher"]
        rng_states = checkpoint["rng"]
        if len(rng_states) == self.runtime.world_size:
            restore_rng_state(rng_states[self.runtime.rank])
        else:
            self.runtime.log(f"note: the checkpoint was written by {len(rng_states)} process(es) and this run has "
                             f"{self.runtime.world_size}: random streams restart from --seed, so the run continues "
                             f"but not bit-identically")
            torch.manual_seed(self.args.seed + self.runtime.rank)
        best = (f"best {self.task.metric_label} so far {self.best:.2f} (epoch {self.best_epoch})" if self.best_epoch
                else "no epoch tested yet")
        self.runtime.log(f"resumed at {describe_position(checkpoint)} (optimizer step {self.global_step}); {best}")

    def _check_finite(self) -> None:
        """The divergence guard's check (one synchronisation); logs the fp16 steps the scaler skipped."""
        kept = (f"the last good checkpoint, {self.folder.last}, is untouched: --resume continues from it"
                if self.folder.has_checkpoint else "no checkpoint had been written yet")
        skipped = self.guard.check(distributed=self.runtime.distributed, steps_per_epoch=self.steps_per_epoch,
                                   accum_steps=self.args.grad_accum_steps, kept=kept)
        if skipped:
            self.accumulator.skipped_steps += skipped
            self.runtime.log(f"note: fp16 overflow: the gradient scaler skipped {skipped} step(s) "
                             f"({self.guard.skipped_total} in all)")

    # ---- the loop ------------------------------------------------------------------------------------------
    def _micro_batches(self):
        """This epoch's micro-batches from the current position on."""
        args, loader = self.args, self.data.train_loader
        start = self.step_in_epoch * args.grad_accum_steps * self.data.micro_batch
        loader.sampler.set_epoch(self.epoch, start=start)
        return iter(loader)

    def _train_step(self, batches) -> dict:
        """One optimizer step over --grad-accum-steps micro-batches; returns the last micro-batch's outputs."""
        args, runtime = self.args, self.runtime
        for micro in range(args.grad_accum_steps):
            inputs, targets = self.task.to_device(next(batches), runtime.device, args.channels_last)
            closes_step = micro + 1 == args.grad_accum_steps
            sync = self.ddp_model.no_sync() if runtime.distributed and not closes_step else nullcontext()
            with sync:
                with self.precision.autocast():
                    out = self.ddp_model(inputs, targets)
                self.guard.record_loss(out["loss"])
                self.scaler.scale(out["loss"] / args.grad_accum_steps).backward()
            out.update(self.task.train_metrics(out, targets))
            self.accumulator.add(out, self.task.batch_size(targets))
        self.guard.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1
        self.steps_this_invocation += 1
        if self.steps_this_invocation == 1:
            self._report_graphed_heads()
        return out

    def _report_graphed_heads(self) -> None:
        """After the first step, what each graphed head actually ran (a failed capture or self-check falls back)."""
        for name, head in self.model.head_modules().items():
            if isinstance(head, CUDAGraphHead):
                reason = f" ({head.fallback_reason})" if head.fallback_reason else ""
                self.runtime.log(f"{name} head ran {head.path} in the first step{reason}")

    def _at_safe_point(self, out: dict, progress_rate: float | None) -> str | None:
        """After a step: the progress line (with ``progress_rate``), finiteness and checkpoints; returns why the
        run must pause, if it must."""
        args, runtime = self.args, self.runtime
        epoch_done = self.step_in_epoch == self.steps_per_epoch
        if progress_rate is not None:
            self._check_finite()
            runtime.log(f"epoch {self.epoch + 1}/{args.epochs} step {self.step_in_epoch}/{self.steps_per_epoch} "
                        f"loss {out['loss'].item():.4f} {self.task.task_loss} {out[self.task.task_loss].item():.4f} "
                        f"lr {self.optimizer.param_groups[0]['lr']:.4g} {progress_rate:.0f} img/s")
        if args.max_steps is not None and self.steps_this_invocation >= args.max_steps and not epoch_done:
            return "max-steps"  # at an epoch end the epoch closes first
        agreed = progress_rate is not None or not runtime.distributed  # where every process decides together
        if agreed and runtime.any_process(self.stop.requested):
            return "stop"
        if self.interval_s is not None:
            due = agreed and runtime.any_process(time.monotonic() - self.last_checkpoint_time >= self.interval_s)
        else:
            due = self.global_step - self.last_checkpoint_step >= self.interval_steps
        if due and not epoch_done:
            self._save()
        return None

    def train_epoch(self) -> str | None:
        """Trains the current epoch from the current position to its end; returns why it paused, or None."""
        self.model.train()
        if self.accumulator.start_lr is None:
            self.accumulator.start_lr = self.optimizer.param_groups[0]["lr"]
        batches = self._micro_batches()
        started = interval_start = time.perf_counter()
        interval_seen = self.accumulator.seen
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                out = self._train_step(batches)
                rate = None
                if self.step_in_epoch % self.args.log_interval == 0 or self.step_in_epoch == self.steps_per_epoch:
                    now = time.perf_counter()
                    images = (self.accumulator.seen - interval_seen) * self.runtime.world_size
                    rate = images / max(now - interval_start, 1e-9)
                    interval_start, interval_seen = now, self.accumulator.seen
                reason = self._at_safe_point(out, rate)
                if reason:
                    return reason
        finally:
            self.accumulator.elapsed_s += time.perf_counter() - started
        return None

    def _close_epoch(self) -> None:
        """Evaluates (when due), records the epoch's row, checkpoints the epoch end and writes the outputs."""
        args, runtime = self.args, self.runtime
        epoch = self.epoch + 1
        means = self.accumulator.means(runtime)
        images = means.pop("images")
        row = {"epoch": epoch, "lr": self.accumulator.start_lr, **means, "steps": self.steps_per_epoch,
               "epoch_time_s": self.accumulator.elapsed_s, "images_per_s": images / max(self.accumulator.elapsed_s,
                                                                                        1e-9)}
        if self.scaler.is_enabled():
            row["skipped_steps"] = self.accumulator.skipped_steps
        if epoch == args.epochs or epoch % args.eval_interval == 0:
            val = self.task.evaluate(self.model.student, self.data.val_loader, runtime, self.precision,
                                     args.channels_last, self.stop)
            row.update({f"val_{k}": v for k, v in val.items()})
        is_best = row.get("val_" + self.task.metric, -1.0) > self.best
        if is_best:
            self.best, self.best_epoch = row["val_" + self.task.metric], epoch
        self.history.append(row)
        self.epoch, self.step_in_epoch = epoch, 0
        self.accumulator = EpochAccumulator(runtime.device)
        self._save(is_best=is_best)
        # Terms that are zero throughout (a head's AE loss without an AE) are left out of the line.
        terms = " ".join(f"{k[6:]} {v:.4g}" for k, v in means.items()
                         if k not in ("train_loss", "train_top1") and v != 0)
        test = f"test {self.task.describe({k[4:]: v for k, v in row.items() if k.startswith('val_')})}" \
            if "val_" + self.task.metric in row else "not evaluated"
        runtime.log(f"epoch {epoch}/{args.epochs}: train loss {means['train_loss']:.4f} ({terms}) | {test} | "
                    f"{row['images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f} s")
        if runtime.is_main:
            self.folder.write_outputs(self.history, self.title)

    @property
    def title(self) -> str:
        return run_title(self.args, self.folder.path.name)

    def fit(self) -> RunResult:
        args, runtime = self.args, self.runtime
        try:
            self.measure_teacher()
            if self.epoch >= args.epochs:
                runtime.log(f"nothing to do: the run already finished its {args.epochs} epochs")
            while self.epoch < args.epochs:
                reason = self.train_epoch()
                if reason:
                    return self._pause(reason)
                self._close_epoch()
                if args.max_steps is not None and self.steps_this_invocation >= args.max_steps \
                        and self.epoch < args.epochs:
                    return self._pause("max-steps")
        except EvaluationInterrupted:
            return self._pause("stop")
        last, label = self._last_evaluated(), self.task.metric_label
        teacher = f"; teacher {self.teacher_value:.2f}" if self.teacher_value is not None else ""
        self._draw_predictions()
        runtime.log(f"final: last-epoch {label} {last:.2f} (epoch {self.epoch}), best {label} {self.best:.2f} "
                    f"(epoch {self.best_epoch}){teacher}; outputs in {self.folder}")
        return self._result(last, finished=True)

    def _draw_predictions(self) -> None:
        """plots/predictions.png for detection and segmentation: a few test images, the student's predictions
        and the teacher's."""
        if not (self.runtime.is_main and hasattr(self.task, "draw")):
            return
        # A model trained alone (a teacher, say) is no student: its column is named by its architecture.
        models = {"student" if self.model.teacher is not None else f"{self.args.student} (trained alone)":
                  self.model.student}
        if self.model.teacher is not None:
            models = {"teacher": self.model.teacher, **models}
        self.task.draw(models, self.data.val_loader.dataset, self.data.info, self.runtime.device,
                       self.folder.path / "plots" / "predictions.png")

    def _last_evaluated(self) -> float:
        key = "val_" + self.task.metric
        return next((row[key] for row in reversed(self.history) if key in row), float("nan"))

    def _result(self, last: float, finished: bool) -> RunResult:
        return RunResult(self.folder, last, self.best, self.best_epoch, self.teacher_value, self.data.val_size,
                         finished)

    def _pause(self, reason: str) -> RunResult:
        """Checkpoints the position; after --max-steps tests the student as it stands, after a stop raises."""
        if self.global_step != self.last_checkpoint_step or not self.folder.has_checkpoint:
            self._save()
        where = describe_position({"epoch": self.epoch, "step_in_epoch": self.step_in_epoch})
        command = f"python -m diffkd.train --resume {self.folder}"
        if reason == "stop":
            self.runtime.log(f"stopped ({self.stop.reason}) at {where}; the position is saved in {self.folder.last}")
            raise RunInterrupted(f"stopped at {where}; the position is saved in {self.folder.last}", command)
        if self.step_in_epoch == 0 and self.history and "val_" + self.task.metric in self.history[-1]:
            value = self._last_evaluated()
            self.runtime.log(f"stopped at --max-steps {self.args.max_steps}, at {where}; continue with: {command}")
        else:
            val = self.task.evaluate(self.model.student, self.data.val_loader, self.runtime, self.precision,
                                     self.args.channels_last)
            value = val[self.task.metric]
            self.runtime.log(f"stopped at --max-steps {self.args.max_steps}, at {where}: test "
                             f"{self.task.describe(val)} (mid-run, not in summary.csv); continue with: {command}")
        return self._result(value, finished=False)
