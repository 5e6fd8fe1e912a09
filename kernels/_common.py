"""Backend resolution, the per-signature caches and the eager autograd shared by every op in ``kernels``.

Backend.  Resolved here and only here, by ``choose_backend``, which every op, the DiffKD head's choice between
in-kernel and tensor noise, diffkd's CUDA-graph wrapper and the benchmarks ask: an explicit ``backend=`` argument
wins, then the environment variable ``DIFFKD_BACKEND``, then "auto".  "auto" runs the PyTorch reference, except for CUDA tensors of a supported dtype
while a CUDA graph is being captured on the current stream, or inside ``auto_uses_triton()``: there each op follows
its entry in ``AUTO_TRITON_IN_GRAPHS``.  Why graphs only: measured on an H200
(benchmarks/results/nvidia-h200-2026-11-26*.md), an eager Triton call cost about 100 µs of host time when every
call went through torch.library's dispatcher, so the eager chain was ~2x slower with the kernels than with PyTorch,
while inside a CUDA graph the launch cost vanishes and the fused chain runs ~5x faster than eager.  The eager path
now launches the kernels directly (below); until that is measured on a GPU (benchmarks/test_op_launch.py),
"auto" keeps PyTorch outside graphs.  "auto" never selects Triton's CPU interpreter: it runs only when
``backend="triton"`` is asked for explicitly with ``TRITON_INTERPRET=1`` set before Triton is imported.

Eager and traced paths.  An op's eager Triton call goes from its public function straight to a
``torch.autograd.Function`` (``eager_autograd``) whose forward and backward call the op's launchers.  Its
``torch.library`` custom op (with ``register_fake`` and ``register_autograd``) is used only while
``torch.compile`` traces (``torch.compiler.is_compiling()``), and by ``opcheck``.

Signatures.  The host work that depends only on the tensors' shapes, strides, dtypes and devices — input
validation, what backend resolution needs to know, the launch plan (strides, merged layout, tiles, grid, the
autotuned config) — is done by the first call with a given signature and reused by later calls
(``SignatureCache``).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from kernels._triton import TRITON_AVAILABLE

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "DIFFKD_BACKEND"
# Set by the test-suite: every output buffer a kernel writes is NaN-filled first, so unwritten elements show.
# Read once, at import (it is a test flag, not a setting).
POISON_ENV = "DIFFKD_POISON_OUTPUTS"
POISON_OUTPUTS = os.environ.get(POISON_ENV, "0") == "1"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The elementwise kernels index elements (and noise) with 32-bit logical indices.
INT32_LIMIT = 2 ** 31

# What "auto" runs for CUDA tensors inside a CUDA graph (and inside auto_uses_triton()), per op: True = Triton.
# Flip an entry after measuring both backends inside a graph on a GPU.
# - The fused elementwise ops: in an H200 CUDA graph the 5-step chain with the kernels took 4.77 ms (fp32) and
#   4.18 ms (bf16) against 25.9 / 21.0 ms for eager PyTorch (benchmarks/results/nvidia-h200-2026-11-26-rerun.md).
# - conv1x1: not yet measured inside a graph.  The only committed comparison
#   (benchmarks/results/parity-nvidia-h200-2026-11-26.json, "conv1x1_speed_vs_cudnn": Triton 0.129 / 0.156 ms,
#   cuDNN 0.019 / 0.022 ms) timed eager calls that still carried ~100 µs of dispatcher host time each, which a
#   graph removes, so it does not decide this entry.
AUTO_TRITON_IN_GRAPHS = {
    "ddim_step": True,
    "ddim_step_embed": True,
    "noise_blend": True,
    "q_sample": True,
    "squared_error_mean": True,
    "conv1x1": True,
}


class _AutoState(threading.local):
    depth = 0  # nesting depth of auto_uses_triton() in this thread


_AUTO_STATE = _AutoState()


@contextlib.contextmanager
def auto_uses_triton():
    """Inside this block "auto" resolves for CUDA tensors exactly as it does during CUDA-graph capture.

    For running an eager twin of a captured step (a warm-up, a check of the first replay, a fallback) with the
    same kernels, so with the same in-kernel noise streams, as the graph.  CPU tensors still run PyTorch, and an
    explicit backend or ``DIFFKD_BACKEND`` still wins.  Thread-local, like ``torch.no_grad``.
    """
    _AUTO_STATE.depth += 1
    try:
        yield
    finally:
        _AUTO_STATE.depth -= 1


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


class BackendTraits(NamedTuple):
    """What backend resolution needs to know about a call's tensors; fixed by their signature."""
    on_cuda: bool
    triton_dtypes: bool  # every floating-point tensor has a dtype the kernels support
    fits_int32: bool  # small enough for the kernels' 32-bit element indices
    largest: int  # elements of the largest tensor that the 32-bit limit applies to
    devices: tuple[torch.device, ...]
    dtypes: tuple[torch.dtype, ...]


def backend_traits(*tensors: torch.Tensor | None, int32_indexed: bool = True) -> BackendTraits:
    """The traits of the tensors that decide an op's backend (None stands for an absent optional tensor)."""
    present = [t for t in tensors if t is not None]
    largest = max((t.numel() for t in present), default=0) if int32_indexed else 0
    return BackendTraits(on_cuda=bool(present) and all(t.is_cuda for t in present),
                         triton_dtypes=all(t.dtype in TRITON_DTYPES for t in present if t.is_floating_point()),
                         fits_int32=largest < INT32_LIMIT, largest=largest,
                         devices=tuple(t.device for t in present), dtypes=tuple(t.dtype for t in present))


def in_graph_here() -> bool:
    """True while a CUDA graph is being captured on the current stream, or inside auto_uses_triton()."""
    return _AUTO_STATE.depth > 0 or torch.cuda.is_current_stream_capturing()


def _auto_can_run(traits: BackendTraits) -> bool:
    """Whether "auto" may pick the compiled Triton kernels for tensors with ``traits`` (never the interpreter)."""
    return traits.on_cuda and traits.triton_dtypes and traits.fits_int32 and TRITON_AVAILABLE


def choose_backend(backend: str | None, op: str | None, traits: BackendTraits, *,
                   in_graph: bool | None = None) -> str:
    """The one backend resolver: "torch" or "triton" for one call of ``op`` on tensors with ``traits``.

    ``op`` is a key of ``AUTO_TRITON_IN_GRAPHS`` (None: the rule every op shares, without the table).
    ``in_graph`` says where the call runs: None = here (inside a CUDA-graph capture on this stream or inside
    ``auto_uses_triton()``, else eagerly); True / False predict a call inside / outside a graph.  Refuses an
    explicit "triton" that cannot run, naming the fix.
    """
    requested = backend if backend in BACKENDS else validate_backend_name(backend)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if not ((op is None or AUTO_TRITON_IN_GRAPHS[op]) and _auto_can_run(traits)):
            return "torch"
        return "triton" if (in_graph_here() if in_graph is None else in_graph) else "torch"  # CUDA asked last
    if not TRITON_AVAILABLE:
        raise ValueError("backend 'triton' was requested but triton does not import; install triton "
                         "(it ships with PyTorch's Linux builds) or use backend='torch'")
    if not traits.on_cuda and not interpreter_enabled():
        devices = sorted({str(device) for device in traits.devices})
        raise ValueError(f"backend 'triton' needs CUDA tensors, got tensors on {devices}; move them to a GPU, "
                         "use backend='torch', or set TRITON_INTERPRET=1 before importing diffkd to run the "
                         "kernels in Triton's (slow) CPU interpreter")
    if not traits.triton_dtypes:
        dtypes = sorted({str(dtype) for dtype in traits.dtypes})
        raise ValueError(f"backend 'triton' supports float32, float16 and bfloat16, got {dtypes}; "
                         "use backend='torch' for other dtypes")
    if not traits.fits_int32:
        raise ValueError(f"{op}: tensors of {traits.largest} elements are too large for the Triton backend "
                         f"(limit {INT32_LIMIT - 1}); split the batch or use backend='torch'")
    return "triton"


def resolve_backend(backend: str | None, *tensors: torch.Tensor, op: str | None = None,
                    in_graph: bool | None = None) -> str:
    """``choose_backend`` for a call on ``tensors``: returns "torch" or "triton"."""
    return choose_backend(backend, op, backend_traits(*tensors), in_graph=in_graph)


def device_traits(device: torch.device | str, dtype: torch.dtype) -> BackendTraits:
    """The traits of a call on tensors of ``device`` and ``dtype``, for a prediction made without tensors (e.g. of
    a CUDA run on a machine without a GPU)."""
    device = torch.device(device)
    return BackendTraits(on_cuda=device.type == "cuda", triton_dtypes=dtype in TRITON_DTYPES or not
                         dtype.is_floating_point, fits_int32=True, largest=0, devices=(device,), dtypes=(dtype,))


def op_backends(backend: str | None, traits: BackendTraits, *, in_graph: bool | None = None) -> dict[str, str]:
    """``choose_backend`` for every op of ``AUTO_TRITON_IN_GRAPHS``: what a model built of these ops runs."""
    return {op: choose_backend(backend, op, traits, in_graph=in_graph) for op in AUTO_TRITON_IN_GRAPHS}


# ---- per-signature caches -------------------------------------------------------------------------------------
MAX_SIGNATURES = 512  # per cache; a cache that fills up starts over (shapes rarely vary that much)
_SIGNATURE_CACHES: list[SignatureCache] = []


def signature(args) -> tuple:
    """(shape, strides, dtype, device) for each tensor of ``args``; other arguments (None, flags) as they are."""
    return tuple([(a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args])


class SignatureCache:
    """``build(*args)`` memoised per ``signature(args)``; a ``build`` that raises (bad input) stores nothing.

    While torch.compile traces, ``build`` runs on every call and nothing is stored (a traced dict would guard on
    its contents).
    """

    def __init__(self, build: Callable):
        self._build = build
        self._entries: dict = {}
        _SIGNATURE_CACHES.append(self)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self._build(*args)
        key = signature(args)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._build(*args)
            if len(self._entries) >= MAX_SIGNATURES:
                self._entries.clear()
            self._entries[key] = entry
        return entry


def clear_signature_caches() -> None:
    """Forgets every cached validation and launch plan (for tests that change tile budgets)."""
    for cache in _SIGNATURE_CACHES:
        cache._entries.clear()


class CheckedCall:
    """A call signature that passed an op's validation: its backend traits and, after its first Triton call,
    its forward launch plan."""
    __slots__ = ("traits", "plan")

    def __init__(self, traits: BackendTraits):
        self.traits = traits
        self.plan = None

    def forward_plan(self, build: Callable, *args):
        """The call's forward launch plan, made by ``build(*args)`` on its first Triton call."""
        if self.plan is None:
            self.plan = build(*args)
        return self.plan


def checked_calls(validate: Callable) -> SignatureCache:
    """A cache of ``CheckedCall`` per signature; ``validate(*args)`` raises for bad input, else returns the
    backend traits of the call."""
    return SignatureCache(lambda *args: CheckedCall(validate(*args)))


# ---- eager autograd -------------------------------------------------------------------------------------------
def eager_autograd(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """The eager twin of a custom op with registered autograd, as a plain ``torch.autograd.Function``.

    ``apply(*inputs, plan)`` runs ``forward(*inputs, plan)`` (the launcher) and ``setup_context(ctx, inputs,
    output)`` (the one registered with the op); ``backward(ctx, *grads)`` returns the inputs' gradients and must
    call launchers, not the op's registered backward ops.  Gradients of unused outputs arrive as None (at least
    one is not None: without any, every input gets None).
    """
    def forward_fn(ctx, *inputs_and_plan):
        ctx.set_materialize_grads(False)
        output = forward(*inputs_and_plan)
        setup_context(ctx, inputs_and_plan[:-1], output)
        return output

    @once_differentiable
    def backward_fn(ctx, *grads):
        if all(grad is None for grad in grads):
            return (None,) * len(ctx.needs_input_grad)
        return (*backward(ctx, *grads), None)

    # Built with type() so that autograd names the graph node after the op (e.g. DDIMStepBackward).
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_fn),
                                                   "backward": staticmethod(backward_fn)})


# ---- autotuned launches ---------------------------------------------------------------------------------------
class TunedLaunch:
    """Launches an ``@triton.autotune`` kernel for one argument signature with ``grid_of(config)``.

    The first launch goes through the autotuner, which benchmarks its configs once per tuning key (only on a GPU:
    the interpreter has one config) or reuses the config it chose before; later launches call the jitted kernel
    directly with that config, skipping the autotuner's per-call key building.  Warm it up before CUDA-graph
    capture, like any autotuned kernel.
    """
    __slots__ = ("grid_of", "config", "grid")

    def __init__(self, grid_of: Callable[[dict], tuple]):
        self.grid_of = grid_of
        self.config: dict | None = None
        self.grid: tuple | None = None

    def __call__(self, kernel, *args, **options) -> None:
        if self.config is None:
            kernel[self.grid_of](*args, **options)
            self.config = kernel.best_config.all_kwargs()
            self.grid = self.grid_of(self.config)
        else:
            kernel.fn[self.grid](*args, **options, **self.config)


# ---- tensors --------------------------------------------------------------------------------------------------
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
    if len(shape) == 4:
        out = torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format)
    else:
        out = torch.empty(shape, dtype=dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def memory_format_of(x) -> torch.memory_format:
    """The memory format an output should keep to match ``x`` (channels-last stays channels-last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
