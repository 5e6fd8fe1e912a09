"""One training run from resolved settings, and what its failures say about its folder."""
from __future__ import annotations

import argparse
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from diffkd.train.checkpoint import describe_position, read_checkpoint
from diffkd.train.errors import RunInterrupted, UsageError
from diffkd.train.loop import RunResult, Trainer
from diffkd.train.run_folder import RunFolder, default_experiment_name
from diffkd.train.runtime import Runtime, StopRequest


class BugError(Exception):
    """An unexpected exception inside a run: its traceback is in the run's log."""

    exit_code = 1

    def __init__(self, details: str, log_path: Path | None):
        super().__init__("unexpected error")
        self.details, self.log_path = details, log_path


def folder_status(folder: RunFolder, resume_command: str) -> str:
    """What the folder holds now and how to go on from it (for messages after a stop or a failure)."""
    if folder.has_checkpoint:
        try:
            where = describe_position(read_checkpoint(folder.last))
        except UsageError:
            where = "its last position"
        return f"the last checkpoint ({where}) in {folder} is intact; continue with: {resume_command}"
    return (f"no checkpoint was written yet, so nothing of the run is lost: rerun the same command, or "
            f"{resume_command}, to start it from step 0")


def _describe_failure(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory; lower --batch-size (or use --grad-accum-steps to keep the same global batch)"
    if isinstance(error, OSError):
        target = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{target}"
    return str(error)


def run(args: argparse.Namespace, runtime: Runtime, argv: Sequence[str], checkpoint: dict | None = None, *,
        resume_command: str | None = None, stop: StopRequest | None = None) -> RunResult:
    """Trains one run (resuming from ``checkpoint`` when given).  Stops and failures end in a one-line error that
    says what the folder holds; an unexpected exception is a BugError whose traceback went to the log."""
    args.experiment = args.experiment or default_experiment_name(args)
    folder = RunFolder(Path(args.output) / args.experiment)
    resume_command = resume_command or f"python -m diffkd.train --resume {folder.path}"
    folder.check_usable(resume=args.resume is not None)
    stop = stop or StopRequest()
    runtime.current_status = lambda: folder_status(folder, resume_command)
    try:
        trainer = Trainer(args, runtime, folder, argv, checkpoint=checkpoint, stop=stop)
        with stop.handling_signals():
            return trainer.fit()
    except RunInterrupted as interrupted:
        raise RunInterrupted(str(interrupted), resume_command) from None
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): stopped at once, without a checkpoint of its own
        if runtime.log_path is not None and runtime.is_main:
            with open(runtime.log_path, "a") as file:
                signal = f"a second {stop.reason}" if stop.requested else "Ctrl-C"
                file.write(f"interrupted at once by {signal}: the steps since the last checkpoint are lost; "
                           f"{folder_status(folder, resume_command)}\n")
        raise
    except UsageError:
        raise
    except (OSError, ValueError, torch.OutOfMemoryError) as error:
        if not folder.path.is_dir():
            raise UsageError(_describe_failure(error)) from None
        raise UsageError(f"{_describe_failure(error)}; {folder_status(folder, resume_command)}") from None
    except Exception:
        details = traceback.format_exc()
        if runtime.log_path is not None:
            with open(runtime.log_path, "a") as file:
                file.write(details)
        raise BugError(details, runtime.log_path) from None
    finally:
        runtime.stop_log_file()
