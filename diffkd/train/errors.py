"""The errors a run reports in one line (``main`` prints them without a traceback and exits non-zero)."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input, or a run that cannot go on: the message says what to do."""

    exit_code = 2


class DivergedError(UsageError):
    """The loss stopped being finite (or fp16 steps kept overflowing)."""

    exit_code = 3


class RunInterrupted(Exception):
    """A stop that was asked for (Ctrl-C, SIGTERM): the run saved its position and can be resumed."""

    exit_code = 130

    def __init__(self, message: str, resume_command: str):
        super().__init__(message)
        self.resume_command = resume_command
