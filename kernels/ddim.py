"""Fused DDIM step: x_prev = a·x + b·ε̂, optionally also emitting the next denoiser input x_prev + E[t_next].

One kernel per direction.  Forward reads x and ε̂ once and writes x_prev (and x_prev + emb).  Backward reads the
incoming gradients once, g = g_x_prev + g_next_input, and writes dx = a·g and dε̂ = b·g; nothing is saved.  With
the embedding, d emb[c] = Σ over batch and space of g_next_input: each program writes the per-channel sums of its
tile into a partial buffer (one row per program) that a deterministic column sum finishes — no atomics.
"""
from __future__ import annotations

import functools
import numbers

import torch

from kernels import reference
from kernels._common import (BackendTraits, SignatureCache, backend_traits, check_same_device_and_dtype,
                             checked_calls, choose_backend, eager_autograd)
from kernels._layout import (accumulation_dtype, allocate, as_bchw, new_output, new_output_like, output_layout,
                             plan_elementwise, tile_coordinates, tile_offsets)
from kernels._triton import tl, triton


@triton.jit
def _ddim_step_kernel(x_ptr, eps_ptr, emb_ptr, out_ptr, next_input_ptr, a, b, emb_stride, C, R, S, W,
                      x_sb, x_sc, x_sh, x_sw, e_sb, e_sc, e_sh, e_sw,
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


# ---- launchers --------------------------------------------------------------------------------------------------
def _forward_plan(x, eps, emb):
    out = output_layout(x)
    return plan_elementwise([x, eps, out, out], tiles_over=out, outputs=(out,), dtype=x.dtype,
                            extras=(emb.stride(0) if emb is not None else 0,),
                            constexprs={"WITH_EMBEDDING": emb is not None})


_FORWARD_PLANS = SignatureCache(_forward_plan)


def _launch_forward(x, eps, a, b, emb, plan=None):
    """(x_prev, next_input) for 4-D x and ε̂; without emb, next_input is x_prev itself.

    ``plan``: the caller's, else looked up for these tensors.
    """
    if plan is None:
        plan = _FORWARD_PLANS(x, eps, emb)
    out = allocate(plan.outputs[0])
    next_input = allocate(plan.outputs[0]) if emb is not None else out
    _ddim_step_kernel[plan.grid](x, eps, emb if emb is not None else out, out, next_input, a, b, *plan.args,
                                 **plan.options)
    return out, next_input


def _launch_step(x, eps, a, b, plan=None):
    return _launch_forward(x, eps, a, b, None, plan)[0]


def _backward_plan(grad_prev, grad_next):
    like = grad_prev if grad_prev is not None else grad_next
    grads = output_layout(like)
    return plan_elementwise([grad_prev, grad_next, grads, grads], tiles_over=grads, outputs=(grads,),
                            dtype=like.dtype,
                            constexprs={"HAS_GRAD_PREV": grad_prev is not None, "HAS_GRAD_NEXT": grad_next is not None})


_BACKWARD_PLANS = SignatureCache(_backward_plan)


def _launch_backward(grad_prev, grad_next, a, b):
    """dx, dε̂ and (when grad_next is given) d emb; at least one gradient must be given."""
    plan = _BACKWARD_PLANS(grad_prev, grad_next)
    like = grad_prev if grad_prev is not None else grad_next
    dx, deps = allocate(plan.outputs[0]), allocate(plan.outputs[0])
    demb_partials = new_output((plan.grid[0], like.shape[1]), like=like, dtype=accumulation_dtype(like.dtype)) \
        if grad_next is not None else dx
    _ddim_step_backward_kernel[plan.grid](
        grad_prev if grad_prev is not None else like, grad_next if grad_next is not None else like,
        dx, deps, demb_partials, a, b, *plan.args, **plan.options)
    if grad_next is None:
        return dx, deps, None
    return dx, deps, demb_partials.sum(dim=0).to(grad_next.dtype)


# ---- autograd, shared by the traced op and the eager Function: ``backward`` is the op or the launcher -----------
def _save_coefficients(ctx, inputs, output):
    ctx.a, ctx.b = inputs[2], inputs[3]


def _step_input_grads(backward, ctx, grad):
    dx, deps, _ = backward(grad, None, ctx.a, ctx.b)
    return dx, deps, None, None


def _step_embed_input_grads(backward, ctx, grad_prev, grad_next):
    """Either gradient may be None (the eager Function does not materialise an unused output's gradient)."""
    dx, deps, demb = backward(grad_prev, grad_next, ctx.a, ctx.b)
    if demb is None and ctx.needs_input_grad[4]:  # next_input unused: emb still gets its (zero) gradient
        demb = grad_prev.new_zeros(grad_prev.shape[1])
    return dx, deps, None, None, demb


# ---- operators (torch.library: torch.compile and opcheck) -----------------------------------------------------
@torch.library.custom_op("diffkd::ddim_step", mutates_args=())
def _ddim_step_op(x: torch.Tensor, eps: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return _launch_step(x, eps, a, b)


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


def _traced_backward(grad_prev, grad_next, a, b):
    if grad_next is None:
        dx, deps = torch.ops.diffkd.ddim_step_backward(grad_prev, a, b)
        return dx, deps, None
    return torch.ops.diffkd.ddim_step_embed_backward(grad_prev, grad_next, a, b)


_ddim_step_op.register_autograd(functools.partial(_step_input_grads, _traced_backward),
                                setup_context=_save_coefficients)
_ddim_step_embed_op.register_autograd(functools.partial(_step_embed_input_grads, _traced_backward),
                                      setup_context=_save_coefficients)

# ---- eager autograd (no dispatcher) -----------------------------------------------------------------------------
_EagerStep = eager_autograd("DDIMStep", _launch_step, _save_coefficients,
                            functools.partial(_step_input_grads, _launch_backward))
_EagerStepEmbed = eager_autograd("DDIMStepEmbed", _launch_forward, _save_coefficients,
                                 functools.partial(_step_embed_input_grads, _launch_backward))


# ---- public API -------------------------------------------------------------------------------------------------
def _host_float(name: str, value) -> float:
    """A step coefficient as a Python float; a CUDA tensor would force a device sync (and break graph capture)."""
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_cuda:
            raise ValueError(f"ddim_step: {name} must be a Python float (or a one-element CPU tensor), got a tensor "
                             f"of shape {tuple(value.shape)} on {value.device}; pass the schedule's coefficients as "
                             "host floats, e.g. A.tolist()")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"ddim_step: {name} must be a Python float, got {type(value).__name__}")
    return float(value)


def _check_step_inputs(x: torch.Tensor, eps: torch.Tensor, emb: torch.Tensor | None = None) -> BackendTraits:
    check_same_device_and_dtype("ddim_step", x=x, eps=eps)
    if x.shape != eps.shape:
        raise ValueError(f"ddim_step: x and eps must have one shape, got {tuple(x.shape)} and {tuple(eps.shape)}")
    as_bchw(x, "x", "ddim_step")
    if emb is not None:
        check_same_device_and_dtype("ddim_step_embed", x=x, emb=emb)
        if emb.shape != (x.shape[1],):
            raise ValueError(f"ddim_step_embed: emb must be one value per channel, shape ({x.shape[1]},), "
                             f"got {tuple(emb.shape)}")
    return backend_traits(x, eps, emb)


_STEP_CALLS = checked_calls(_check_step_inputs)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, *, backend: str | None = None) -> torch.Tensor:
    """One DDIM step in its affine form, x_prev = a·x + b·ε̂, for (B, C[, H[, W]]) tensors of any layout.

    ``a`` and ``b`` are Python floats (captured by value in CUDA graphs).  The output keeps x's memory format.
    Gradients: dx = a·g, dε̂ = b·g.
    """
    a, b = _host_float("a", a), _host_float("b", b)
    call = _STEP_CALLS(x, eps)
    if choose_backend(backend, "ddim_step", call.traits) == "torch":
        return reference.ddim_step(x, eps, a, b)
    x4, eps4 = as_bchw(x, "x", "ddim_step"), as_bchw(eps, "eps", "ddim_step")
    if torch.compiler.is_compiling():
        x_prev = _ddim_step_op(x4, eps4, a, b)
    else:
        x_prev = _EagerStep.apply(x4, eps4, a, b, call.forward_plan(_forward_plan, x4, eps4, None))
    return x_prev if x.dim() == 4 else x_prev.reshape(x.shape)


def ddim_step_embed(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, emb: torch.Tensor, *,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM step plus the next denoiser input: returns (x_prev, x_prev + emb[c]) with emb of shape (C,).

    Gradients: with g = g_x_prev + g_next_input, dx = a·g, dε̂ = b·g, d emb = Σ over batch and space of
    g_next_input (a deterministic two-stage reduction).
    """
    a, b = _host_float("a", a), _host_float("b", b)
    call = _STEP_CALLS(x, eps, emb)
    if choose_backend(backend, "ddim_step_embed", call.traits) == "torch":
        return reference.ddim_step_embed(x, eps, a, b, emb)
    x4, eps4 = as_bchw(x, "x", "ddim_step"), as_bchw(eps, "eps", "ddim_step")
    if torch.compiler.is_compiling():
        x_prev, next_input = _ddim_step_embed_op(x4, eps4, a, b, emb)
    else:
        x_prev, next_input = _EagerStepEmbed.apply(x4, eps4, a, b, emb,
                                                   call.forward_plan(_forward_plan, x4, eps4, emb))
    if x.dim() == 4:
        return x_prev, next_input
    return x_prev.reshape(x.shape), next_input.reshape(x.shape)
