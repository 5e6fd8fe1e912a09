"""Timing shared by every benchmark script.

GPU: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs), median and quartiles.
CPU: all candidates timed in one process, interleaved (each round runs every candidate once, in a rotating
order) after a warm-up, median over the rounds; short calls are repeated in an inner loop calibrated to a few
milliseconds.  On a shared CPU only the ratios between candidates of one run mean something.  Each CPU sample
is taken on two clocks: wall time, and the process's CPU time.  With one torch thread the CPU time is what the
call costs with a core to itself, whatever else the machine runs (``TimingPlan(clock="cpu")``).

Deadlines are absolute ``time.monotonic()`` values (None: no deadline).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch

# Inner-loop target on the CPU: calls shorter than this are repeated so one sample spans about this long.
CPU_SAMPLE_TARGET_S = 0.005
# glibc mallopt parameters (malloc.h): keep freed memory and serve large blocks from the heap, not fresh mmaps.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure: CPU warm-up calls and timed rounds per candidate; do_bench's time on a GPU."""
    warmup: int = 2
    repeats: int = 7
    gpu_rep_ms: float = 100
    clock: str = "wall"  # CPU only: "wall", or "cpu" (process CPU time; meaningful with one torch thread)

    def __post_init__(self):
        if self.repeats < 1 or self.warmup < 0 or self.gpu_rep_ms <= 0:
            raise ValueError(f"a timing plan needs repeats >= 1, warmup >= 0 and gpu_rep_ms > 0, got {self}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")


@dataclass(frozen=True)
class Timing:
    """Per-call time of one candidate: median and quartiles over ``runs`` samples, in milliseconds, on the plan's
    clock; ``other_clock_median_ms`` is the median on the other CPU clock (None on a GPU)."""
    median_ms: float
    q25_ms: float
    q75_ms: float
    runs: int
    clock: str = "cuda events"
    other_clock_median_ms: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def time_left(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline - time.monotonic()


def is_gpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_gpu(device):
        torch.cuda.synchronize(device)


def configure_cpu(threads: int | None) -> dict:
    """Sets torch's intra-op threads (default: every core) and glibc's malloc thresholds; returns what was set.

    First-touch allocation on these VMs is slow and erratic; keeping freed memory in the heap removed a 20× noise
    source in small-op timings.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    malloc_tuned = False
    libc_name = ctypes.util.find_library("c")
    if platform.system() == "Linux" and libc_name:
        try:
            libc = ctypes.CDLL(libc_name)
            malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 ** 3))
        except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
            malloc_tuned = False
    return {"torch_threads": torch.get_num_threads(), "malloc_tuned": malloc_tuned}


def configure_gpu_math(tf32: bool) -> None:
    """TF32 for fp32 on a GPU, for cuDNN convolutions *and* matmuls (the Triton 1×1 GEMM follows the matmul
    flag), so every fp32 provider computes in the same precision.  PyTorch's defaults differ (convolutions on,
    matmuls off), which would pit TF32 cuDNN against an IEEE-fp32 GEMM."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _quartiles(samples_ms: list[float]) -> Timing:
    if len(samples_ms) == 1:
        return Timing(samples_ms[0], samples_ms[0], samples_ms[0], 1)
    q25, median, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(median, q25, q75, len(samples_ms))


def time_gpu(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """CUDA-event timing with triton's do_bench (median and quartiles of the per-call times)."""
    from triton.testing import do_bench

    median, q25, q75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
    return Timing(float(median), float(q25), float(q75), -1)


def _summarise(samples_ms: list[float], other_ms: list[float], clock: str) -> Timing:
    quartiles = _quartiles(samples_ms)
    return Timing(quartiles.median_ms, quartiles.q25_ms, quartiles.q75_ms, quartiles.runs, clock,
                  statistics.median(other_ms))


def _warm_up(fn: Callable[[], object], device, calls: int) -> int:
    """Runs ``calls`` warm-up calls; returns how many calls make one CPU sample of about CPU_SAMPLE_TARGET_S,
    judged by the last warm-up call (1 without warm-up)."""
    elapsed = None
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
    if elapsed is None:
        return 1
    return max(1, min(1000, math.ceil(CPU_SAMPLE_TARGET_S / max(elapsed, 1e-7))))


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, device="cpu", plan: TimingPlan = TimingPlan(),
                     deadline: float | None = None) -> dict[str, Timing]:
    """Times every candidate in rounds; each round runs them all once, the order rotating between rounds.

    Stops early (with at least one round) when ``deadline`` passes.
    """
    if not fns:
        return {}
    names = list(fns)
    inner = {name: _warm_up(fns[name], device, plan.warmup) for name in names}
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(plan.repeats):
        if round_index and time_left(deadline) <= 0:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, count = fns[name], inner[name]
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                fn()
            synchronize(device)
            samples[name]["cpu"].append((time.process_time() - cpu) * 1e3 / count)
            samples[name]["wall"].append((time.perf_counter() - wall) * 1e3 / count)
    other = "cpu" if plan.clock == "wall" else "wall"
    return {name: _summarise(clocks[plan.clock], clocks[other], plan.clock) for name, clocks in samples.items()}


def time_candidates(fns: Mapping[str, Callable[[], object]], device, plan: TimingPlan = TimingPlan(),
                    deadline: float | None = None) -> dict[str, Timing]:
    """GPU: do_bench for each candidate; CPU: interleaved rounds."""
    if is_gpu(device):
        return {name: time_gpu(fn, rep_ms=plan.gpu_rep_ms) for name, fn in fns.items()}
    return time_interleaved(fns, device=device, plan=plan, deadline=deadline)


def timing_method(device, clock: str = "wall") -> str:
    if is_gpu(device):
        return "triton.testing.do_bench (CUDA events, warm-up, L2 flushed), median"
    clock = "process CPU time" if clock == "cpu" else "wall time"
    return (f"CPU, {torch.get_num_threads()} torch thread(s), {clock}, candidates interleaved in one process after "
            "warm-up, median over rounds; compare ratios, not absolute times")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if is_gpu(device) else _cpu_model()


def card_slug(device) -> str:
    """A file-name-safe name of the card ("nvidia-h100-80gb-hbm3") or "cpu"."""
    if not is_gpu(device):
        return "cpu"
    name = device_name(device).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").replace("--", "-")


def environment(device, clock: str = "wall") -> dict:
    """What a reader needs to reproduce a number: versions, the device, threads."""
    info = {
        "device": str(device), "device_name": device_name(device), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "timing": timing_method(device, clock),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for package in ("triton", "diffusers", "timm"):
        try:  # the installed version, without importing the package (diffusers takes seconds to import)
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if is_gpu(device):
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info
