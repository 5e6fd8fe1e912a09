"""The entry point: settings, then one run or the demo; every expected failure is one line and an exit code."""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch.distributed as dist

from diffkd.train.cli import parse_args
from diffkd.train.demo import run_demo
from diffkd.train.errors import RunInterrupted, UsageError
from diffkd.train.resume import resolve_new_run, resolve_resume
from diffkd.train.runs import BugError, run
from diffkd.train.runtime import setup_runtime


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 on success; otherwise a one-line message (a traceback only for bugs) and a non-zero
    code: 2 bad input, 3 diverged, 130 interrupted, 1 a bug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime = None

    def report(message: str) -> None:  # once, from the main process
        if runtime is None or runtime.is_main:
            print(message, file=sys.stderr, flush=True)

    try:
        warnings: list[str] = []
        args, explicit = parse_args(argv, warnings)
        if args.demo:
            for warning in warnings:
                print(warning, file=sys.stderr, flush=True)
            _, runtime = run_demo(args, explicit, argv)
            return 0
        checkpoint = None
        if args.resume is not None:
            args, checkpoint, notes = resolve_resume(args, explicit)
        else:
            notes = warnings + resolve_new_run(args)
        runtime = setup_runtime(args.device, args.threads)
        for note in notes:
            runtime.log(note)
        run(args, runtime, argv, checkpoint)
    except UsageError as error:
        report(f"error: {error}")
        return error.exit_code
    except RunInterrupted as interrupted:
        report(f"interrupted: {interrupted}; continue with: {interrupted.resume_command}")
        return interrupted.exit_code
    except KeyboardInterrupt:
        status = runtime.current_status() if runtime is not None and runtime.current_status else "nothing was written"
        report(f"interrupted: {status}")
        return 130
    except BugError as bug:
        report(bug.details.rstrip())
        where = f"; the run's log, with this traceback, is {bug.log_path}" if bug.log_path else ""
        report(f"error: an unexpected exception stopped the run — a bug in diffkd, not in your input{where}. "
               f"Please report it with that log.")
        return bug.exit_code
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
