"""The process a run lives in: process group and device, CPU threads, precision, the log, and stop requests."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from diffkd.train.errors import UsageError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    log_path: Path | None = None  # the current run's log.txt; lines printed before it exists wait in _pending
    # What the current run's folder holds and how to continue it, for messages after a failure or Ctrl-C.
    current_status: Callable[[], str] | None = None
    _pending: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, message: str = "", *, file=None) -> None:
        """Prints on the main process (stdout, or ``file``) and appends the line to the current run's log.txt."""
        if not self.is_main:
            return
        print(message, flush=True, file=file or sys.stdout)
        self._pending.append(message)
        if self.log_path is not None:
            self._flush_log()

    def _flush_log(self) -> None:
        with open(self.log_path, "a") as file:  # closed at once: every line is on disk when log() returns
            file.write("".join(line + "\n" for line in self._pending))
        self._pending.clear()

    def start_log_file(self, path: Path) -> None:
        self.log_path = path
        if self.is_main:
            self._flush_log()

    def stop_log_file(self) -> None:
        self.log_path = None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_from_main(self, value):
        """The main process's ``value`` on every process (a collective: every process must call it)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any_process(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (a collective: every process must call it)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def resolve_device(device_name: str) -> str:
    """"cpu" or "cuda" for --device auto|cpu|cuda, or a UsageError when CUDA is asked for and missing."""
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    if device_name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_name


def default_threads() -> int:
    """$OMP_NUM_THREADS (torchrun sets 1 for several processes per machine), else every available core."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def setup_runtime(device_name: str, threads: int | None = None) -> Runtime:
    """Starts the process group when launched by torchrun (gloo on CPU, nccl on GPU), picks the device and
    sets the CPU threads (``threads``, else :func:`default_threads`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = resolve_device(device_name) == "cuda"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(threads or default_threads())
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Runtime(device=device, rank=rank, world_size=world_size)


@dataclass(frozen=True)
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: float32 throughout

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        # No weight-cast cache: it would go stale inside captured CUDA graphs, and costs nothing measurable here.
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed, or metadata unreadable: the report just says so
        return "not installed"


def environment_report(runtime: Runtime, argv: Sequence[str]) -> str:
    lines = [f"started: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"command: python -m diffkd.train {shlex.join(argv)}",
             f"python: {platform.python_version()} ({platform.platform()})"]
    lines += [f"{name}: {_package_version(name)}" for name in ("torch", "torchvision", "timm", "triton", "numpy")]
    if runtime.device.type == "cuda":
        properties = torch.cuda.get_device_properties(runtime.device)
        lines.append(f"device: {runtime.world_size} × {properties.name} ({properties.total_memory / 2**30:.0f} GiB), "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        lines.append(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads per process, "
                     f"{runtime.world_size} process(es))")
    return "\n".join(lines) + "\n"


class StopRequest:
    """Set by the first SIGINT (Ctrl-C) or SIGTERM: the run stops at the next safe point, after the current
    optimizer step or between evaluation batches, with its position checkpointed.  A second signal stops at once
    (KeyboardInterrupt), leaving the last checkpoint as it was."""

    def __init__(self):
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, reason

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        self.request(name)
        print(f"\n{name}: stopping after the current step and saving the run's position (press Ctrl-C again to "
              f"stop at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    @contextmanager
    def handling_signals(self):
        """Installs the handlers for the duration (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
