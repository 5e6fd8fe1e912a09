"""Fused DDIM step: x_prev = a·x + b·ε̂, optionally also emitting the next denoiser input x_prev + E[t_next].

One kernel per direction.  Forward reads x and ε̂ once and writes x_prev (and x_prev + emb).  Backward reads the
incoming gradients once, g = g_x_prev + g_next_input, and writes dx = a·g and dε̂ = b·g; nothing is saved.  With
the embedding, d emb[c] = Σ over batch and space of g_next_input: each program writes the per-channel sums of its
tile into a partial buffer (one row per program) that a deterministic column sum finishes — no atomics.
"""
from __future__ import annotations

import numbers

import torch

from kernels import reference
from kernels._common import check_same_device_and_dtype, resolve_backend
from kernels._layout import (accumulation_dtype, as_bchw, check_index_range, compute_dtype, matrix_sizes,
                             new_output, new_output_like, optional_strides, plan_tiles, spatially_mergeable,
                             strides_bchw, tile_coordinates, tile_offsets)
from kernels._triton import tl, triton


@triton.jit
def _ddim_step_kernel(x_ptr, eps_ptr, emb_ptr, out_ptr, next_input_ptr, a, b, C, R, S, W,
                      x_sb, x_sc, x_sh, x_sw, e_sb, e_sc, e_sh, e_sw, emb_stride,
                      o_sb, o_sc, o_sh, o_sw, n_sb, n_sc, n_sh, n_sw,
                      WITH_EMBEDDING: tl.constexpr, MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    x = tl.load(x_ptr + tile_offsets(channels, rows, S, W, x_sb, x_sc, x_sh, x_sw, MERGED_HW), mask=mask)
    eps = tl.load(eps_ptr + tile_offsets(channels, rows, S, W, e_sb, e_sc, e_sh, e_sw, MERGED_HW), mask=mask)
    x_prev = a * x.to(COMPUTE_DTYPE) + b * eps.to(COMPUTE_DTYPE)
    out_offsets = tile_offsets(channels, rows, S, W, o_sb, o_sc, o_sh, o_sw, MERGED_HW)
    tl.store(out_ptr + out_offsets, x_prev.to(out_ptr.dtype.element_ty), mask=mask)
    if WITH_EMBEDDING:
        emb = tl.load(emb_ptr + channels * emb_stride, mask=channels < C).to(COMPUTE_DTYPE)
        next_offsets = tile_offsets(channels, rows, S, W, n_sb, n_sc, n_sh, n_sw, MERGED_HW)
        tl.store(next_input_ptr + next_offsets, (x_prev + emb[:, None]).to(next_input_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _ddim_step_backward_kernel(grad_prev_ptr, grad_next_ptr, dx_ptr, deps_ptr, demb_partial_ptr, a, b, C, R, S, W,
                               p_sb, p_sc, p_sh, p_sw, n_sb, n_sc, n_sh, n_sw,
                               dx_sb, dx_sc, dx_sh, dx_sw, de_sb, de_sc, de_sh, de_sw,
                               HAS_GRAD_PREV: tl.constexpr, HAS_GRAD_NEXT: tl.constexpr, MERGED_HW: tl.constexpr,
                               COMPUTE_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    grad = tl.zeros((BLOCK_C, BLOCK_R), dtype=COMPUTE_DTYPE)
    if HAS_GRAD_PREV:
        prev_offsets = tile_offsets(channels, rows, S, W, p_sb, p_sc, p_sh, p_sw, MERGED_HW)
        grad += tl.load(grad_prev_ptr + prev_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if HAS_GRAD_NEXT:
        next_offsets = tile_offsets(channels, rows, S, W, n_sb, n_sc, n_sh, n_sw, MERGED_HW)
        grad_next = tl.load(grad_next_ptr + next_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        grad += grad_next
        # Row program_id(0) of the (row blocks × C) d emb partials.
        tl.store(demb_partial_ptr + tl.program_id(0).to(tl.int64) * C + channels, tl.sum(grad_next, axis=1),
                 mask=channels < C)
    dx_offsets = tile_offsets(channels, rows, S, W, dx_sb, dx_sc, dx_sh, dx_sw, MERGED_HW)
    tl.store(dx_ptr + dx_offsets, (a * grad).to(dx_ptr.dtype.element_ty), mask=mask)
    deps_offsets = tile_offsets(channels, rows, S, W, de_sb, de_sc, de_sh, de_sw, MERGED_HW)
    tl.store(deps_ptr + deps_offsets, (b * grad).to(deps_ptr.dtype.element_ty), mask=mask)


def _launch_forward(x, eps, a, b, emb):
    out = new_output_like(x)
    next_input = new_output_like(x) if emb is not None else out
    merged = spatially_mergeable(x, eps, out, next_input)
    plan = plan_tiles(out)
    _ddim_step_kernel[plan.grid](
        x, eps, emb if emb is not None else out, out, next_input, a, b, *matrix_sizes(x),
        *strides_bchw(x, merged), *strides_bchw(eps, merged), emb.stride(0) if emb is not None else 0,
        *strides_bchw(out, merged), *strides_bchw(next_input, merged),
        WITH_EMBEDDING=emb is not None, MERGED_HW=merged, COMPUTE_DTYPE=compute_dtype(x.dtype),
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, num_warps=plan.num_warps)
    return out, next_input


def _launch_backward(grad_prev, grad_next, a, b):
    """dx, dε̂ and (when grad_next is given) d emb; at least one gradient must be given."""
    like = grad_prev if grad_prev is not None else grad_next
    dx, deps = new_output_like(like), new_output_like(like)
    merged = spatially_mergeable(dx, deps, *[g for g in (grad_prev, grad_next) if g is not None])
    plan = plan_tiles(dx)
    channels = like.shape[1]
    demb_partials = new_output((plan.grid[0], channels), like=like, dtype=accumulation_dtype(like.dtype)) \
        if grad_next is not None else dx
    _ddim_step_backward_kernel[plan.grid](
        grad_prev if grad_prev is not None else like, grad_next if grad_next is not None else like,
        dx, deps, demb_partials, a, b, *matrix_sizes(like),
        *optional_strides(grad_prev, merged), *optional_strides(grad_next, merged),
        *strides_bchw(dx, merged), *strides_bchw(deps, merged),
        HAS_GRAD_PREV=grad_prev is not None, HAS_GRAD_NEXT=grad_next is not None, MERGED_HW=merged,
        COMPUTE_DTYPE=compute_dtype(like.dtype), BLOCK_C=plan.block_c, BLOCK_R=plan.block_r,
        num_warps=plan.num_warps)
    if grad_next is None:
        return dx, deps, None
    return dx, deps, demb_partials.sum(dim=0).to(grad_next.dtype)


# ---- operators (torch.library: eager, opcheck, torch.compile) -------------------------------------------------
@torch.library.custom_op("diffkd::ddim_step", mutates_args=())
def _ddim_step_op(x: torch.Tensor, eps: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return _launch_forward(x, eps, a, b, None)[0]


@_ddim_step_op.register_fake
def _(x, eps, a, b):
    return new_output_like(x)


@torch.library.custom_op("diffkd::ddim_step_embed", mutates_args=())
def _ddim_step_embed_op(x: torch.Tensor, eps: torch.Tensor, a: float, b: float,
                        emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(x, eps, a, b, emb)


@_ddim_step_embed_op.register_fake
def _(x, eps, a, b, emb):
    return new_output_like(x), new_output_like(x)


@torch.library.custom_op("diffkd::ddim_step_backward", mutates_args=())
def _ddim_step_backward_op(grad: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    dx, deps, _ = _launch_backward(grad, None, a, b)
    return dx, deps


@_ddim_step_backward_op.register_fake
def _(grad, a, b):
    return new_output_like(grad), new_output_like(grad)


@torch.library.custom_op("diffkd::ddim_step_embed_backward", mutates_args=())
def _ddim_step_embed_backward_op(grad_prev: torch.Tensor | None, grad_next: torch.Tensor, a: float,
                                 b: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_prev, grad_next, a, b)


@_ddim_step_embed_backward_op.register_fake
def _(grad_prev, grad_next, a, b):
    like = grad_prev if grad_prev is not None else grad_next
    return new_output_like(like), new_output_like(like), grad_next.new_empty(grad_next.shape[1])


def _save_coefficients(ctx, inputs, output):
    ctx.a, ctx.b = inputs[2], inputs[3]


def _ddim_step_backward(ctx, grad):
    dx, deps = torch.ops.diffkd.ddim_step_backward(grad, ctx.a, ctx.b)
    return dx, deps, None, None


def _ddim_step_embed_backward(ctx, grad_prev, grad_next):
    if grad_next is None:
        if grad_prev is None:
            return None, None, None, None, None
        dx, deps = torch.ops.diffkd.ddim_step_backward(grad_prev, ctx.a, ctx.b)
        return dx, deps, None, None, None
    dx, deps, demb = torch.ops.diffkd.ddim_step_embed_backward(grad_prev, grad_next, ctx.a, ctx.b)
    return dx, deps, None, None, demb


_ddim_step_op.register_autograd(_ddim_step_backward, setup_context=_save_coefficients)
_ddim_step_embed_op.register_autograd(_ddim_step_embed_backward, setup_context=_save_coefficients)


# ---- public API -------------------------------------------------------------------------------------------------
def _host_float(name: str, value) -> float:
    """A step coefficient as a Python float; a CUDA tensor would force a device sync (and break graph capture)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_cuda:
            raise ValueError(f"ddim_step: {name} must be a Python float (or a one-element CPU tensor), got a tensor "
                             f"of shape {tuple(value.shape)} on {value.device}; pass the schedule's coefficients as "
                             "host floats, e.g. A.tolist()")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"ddim_step: {name} must be a Python float, got {type(value).__name__}")
    return float(value)


def _check_step_inputs(x: torch.Tensor, eps: torch.Tensor) -> None:
    check_same_device_and_dtype("ddim_step", x=x, eps=eps)
    if x.shape != eps.shape:
        raise ValueError(f"ddim_step: x and eps must have one shape, got {tuple(x.shape)} and {tuple(eps.shape)}")
    as_bchw(x, "x", "ddim_step")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, *, backend: str | None = None) -> torch.Tensor:
    """One DDIM step in its affine form, x_prev = a·x + b·ε̂, for (B, C[, H[, W]]) tensors of any layout.

    ``a`` and ``b`` are Python floats (captured by value in CUDA graphs).  The output keeps x's memory format.
    Gradients: dx = a·g, dε̂ = b·g.
    """
    a, b = _host_float("a", a), _host_float("b", b)
    _check_step_inputs(x, eps)
    if resolve_backend(backend, x, eps) == "torch":
        return reference.ddim_step(x, eps, a, b)
    check_index_range("ddim_step", x)
    return _ddim_step_op(as_bchw(x, "x", "ddim_step"), as_bchw(eps, "eps", "ddim_step"), a, b).reshape(x.shape)


def ddim_step_embed(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, emb: torch.Tensor, *,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM step plus the next denoiser input: returns (x_prev, x_prev + emb[c]) with emb of shape (C,).

    Gradients: with g = g_x_prev + g_next_input, dx = a·g, dε̂ = b·g, d emb = Σ over batch and space of
    g_next_input (a deterministic two-stage reduction).
    """
    a, b = _host_float("a", a), _host_float("b", b)
    _check_step_inputs(x, eps)
    check_same_device_and_dtype("ddim_step_embed", x=x, emb=emb)
    if emb.shape != (x.shape[1],):
        raise ValueError(f"ddim_step_embed: emb must be one value per channel, shape ({x.shape[1]},), "
                         f"got {tuple(emb.shape)}")
    if resolve_backend(backend, x, eps, emb) == "torch":
        return reference.ddim_step_embed(x, eps, a, b, emb)
    check_index_range("ddim_step_embed", x)
    x_prev, next_input = _ddim_step_embed_op(as_bchw(x, "x", "ddim_step"), as_bchw(eps, "eps", "ddim_step"), a, b,
                                             emb)
    return x_prev.reshape(x.shape), next_input.reshape(x.shape)
