"""The CUDA operations CUDAGraphHead needs, behind one seam (the tests put a faithful CPU model of
``torch.cuda.make_graphed_callables`` behind it), and the gradient ownership every replay needs.

Capture.  ``torch.cuda.make_graphed_callables`` (torch 2.14 accepts ``capture_error_mode`` and ``pool``) with:
- ``capture_error_mode="thread_local"``: data loaders with ``pin_memory=True`` call ``cudaHostAlloc`` from their
  pin-memory thread; in the default "global" mode that call, made while this thread captures, invalidates the
  capture (and can kill the pin-memory thread).  "thread_local" forbids unsafe calls in the capturing thread only;
- inside ``torch.cuda.device(device)``: the side stream, the memory pool and the graphs are on the features'
  device even when the current device is another one;
- one private memory pool per capture, so that its size can be read (``pool_bytes``) and it is freed with the
  captured step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

CAPTURE_ERROR_MODE = "thread_local"


def owned_copies(grads: tuple) -> tuple:
    """Fresh copies of the gradients that are not None (one multi-tensor copy on a GPU, not one launch each)."""
    present = [g for g in grads if g is not None]
    copies = iter(torch._foreach_mul(present, 1.0) if present else ())
    return tuple(None if g is None else next(copies) for g in grads)


class OwnedGradients(torch.autograd.Function):
    """Identity forward; the backward hands on copies of the gradients, never the tensors it received.

    ``make_graphed_callables``' backward returns ``detach()``-ed aliases of its static gradient buffers.  When a
    parameter's ``.grad`` is None (after ``zero_grad(set_to_none=True)``) autograd's AccumulateGrad installs such an
    alias as ``.grad`` without copying it; the next replay then overwrites ``.grad``, and accumulation adds the
    buffer to itself: 2·g_last instead of g1 + g2 (PyTorch issue 181723; TransformerEngine clones likewise).  The
    features' gradients are copied too: a leaf feature's ``.grad`` would alias the same way.
    """

    @staticmethod
    def forward(ctx, *tensors):
        ctx.set_materialize_grads(False)
        return tensors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return owned_copies(grads)


class CudaGraphRuntime:
    """What CUDAGraphHead needs from CUDA.  The tests substitute a CPU stand-in with the same methods."""

    @staticmethod
    def handles(*tensors: torch.Tensor) -> bool:
        return all(t.is_cuda for t in tensors)

    @staticmethod
    def rng_state(device: torch.device) -> torch.Tensor:
        return torch.cuda.get_rng_state(device)

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
        torch.cuda.set_rng_state(state, device)

    @staticmethod
    def capture(step: Callable, sample_args: tuple, warmup_iterations: int, device: torch.device) -> tuple:
        """(the graphed callable of ``step``, the handle of its private memory pool)."""
        with torch.cuda.device(device):
            pool = torch.cuda.graph_pool_handle()
            graphed = torch.cuda.make_graphed_callables(step, sample_args, num_warmup_iters=warmup_iterations,
                                                        allow_unused_input=True, pool=pool,
                                                        capture_error_mode=CAPTURE_ERROR_MODE)
        return graphed, pool

    @staticmethod
    def pool_bytes(pool, device: torch.device) -> int:
        """Bytes the caching allocator holds in ``pool`` (the segments it reserved for that capture)."""
        segments = torch.cuda.memory_snapshot(mempool_id=pool, include_traces=False)
        return sum(s["total_size"] for s in segments
                   if tuple(s["segment_pool_id"]) == tuple(pool) and s["device"] == device.index)
