"""Backend resolution and helpers shared by every op in ``kernels``.

The backend is resolved here and only here: an explicit ``backend=`` argument wins, then the environment
variable ``DIFFKD_BACKEND``, then "auto".  "auto" picks Triton for CUDA tensors of a supported dtype when Triton
imports *and the call is being captured into a CUDA graph*, the PyTorch reference otherwise.  Why the capture
condition: measured on an H200 (benchmarks/results/nvidia-h200-2026-11-26*.md), each eager Triton call costs about
100 µs of host time, so at DiffKD's shapes (a few MB per tensor) the eager chain is ~2x slower with the kernels than
with PyTorch's, while inside a CUDA graph the launch cost vanishes and the fused chain runs ~5x faster than eager.
"auto" never selects Triton's CPU interpreter: it runs only when ``backend="triton"`` is asked for explicitly
with ``TRITON_INTERPRET=1`` set before Triton is imported.
"""
from __future__ import annotations

import os

import torch

from kernels._triton import TRITON_AVAILABLE

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "DIFFKD_BACKEND"
# Set by the test-suite: every output buffer a kernel writes is NaN-filled first, so unwritten elements show.
POISON_ENV = "DIFFKD_POISON_OUTPUTS"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    # Decided once, at import (kernels._triton); a plain global keeps this traceable by torch.compile.
    return TRITON_AVAILABLE


def validate_backend_name(backend: str | None) -> str:
    """Returns the requested backend name (argument, else environment, else "auto"), validated."""
    source = "backend argument"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or "auto"
        source = f"{BACKEND_ENV} environment variable"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from the {source}); expected one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Resolves the backend for one call on ``tensors``: returns "torch" or "triton"."""
    requested = validate_backend_name(backend)
    if requested == "torch":
        return "torch"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    dtype_ok = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    if requested == "auto":
        fused_pays = on_cuda and dtype_ok and triton_importable() and torch.cuda.is_current_stream_capturing()
        return "triton" if fused_pays else "torch"
    if not triton_importable():
        raise ValueError("backend 'triton' was requested but triton does not import; install triton "
                         "(it ships with PyTorch's Linux builds) or use backend='torch'")
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(f"backend 'triton' needs CUDA tensors, got tensors on {devices}; move them to a GPU, "
                         "use backend='torch', or set TRITON_INTERPRET=1 before importing diffkd to run the "
                         "kernels in Triton's (slow) CPU interpreter")
    if not dtype_ok:
        dtypes = sorted({str(t.dtype) for t in tensors})
        raise ValueError(f"backend 'triton' supports float32, float16 and bfloat16, got {dtypes}; "
                         "use backend='torch' for other dtypes")
    return "triton"


def check_same_device_and_dtype(op: str, **tensors: torch.Tensor) -> None:
    """Mixed devices or dtypes are refused with a message that names every argument."""
    devices = {name: t.device for name, t in tensors.items()}
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise ValueError(f"{op}: all tensors must have one dtype, got {listing}; cast them first")


def new_output(shape, *, like: torch.Tensor, dtype: torch.dtype | None = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Allocates a kernel output; NaN-filled when ``DIFFKD_POISON_OUTPUTS=1`` so unwritten elements show."""
    dtype = dtype or like.dtype
    if os.environ.get(POISON_ENV, "0") == "1":
        out = torch.full(shape, float("nan"), dtype=dtype, device=like.device)
        return out.contiguous(memory_format=memory_format) if len(shape) == 4 else out
    if len(shape) == 4:
        return torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format)
    return torch.empty(shape, dtype=dtype, device=like.device)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output should keep to match ``x`` (channels-last stays channels-last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
