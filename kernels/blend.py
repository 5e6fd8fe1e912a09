"""Adaptive noise matching blend γ·z + (1−γ)·ε with one γ per sample and, optionally, in-kernel noise.

Forward reads z (and ε, unless it is drawn from the seed) once and writes the blend.  Backward reads g and z once,
regenerates ε from the seed when it was drawn in-kernel (it is never stored), and writes dz = γ·g (and
dε = (1−γ)·g for explicit noise); dγ_b = Σ g·(z − ε) over the sample is reduced in two deterministic stages:
each program writes its tile's per-row sums over channels to a partial buffer, and a sum over channel blocks
and each sample's positions finishes it (no atomics).
Seeds and the noise stream are described in ``kernels._noise``.
"""
from __future__ import annotations

import functools

import torch

from kernels import reference
from kernels._common import (SignatureCache, backend_traits, check_same_device_and_dtype, checked_calls,
                             choose_backend, eager_autograd)
from kernels._layout import (accumulation_dtype, allocate, as_bchw, new_output, new_output_like, output_layout,
                             plan_elementwise, tile_coordinates, tile_offsets)
from kernels._noise import check_noise_shape, check_noise_source, noise_tile, seed_tensor
from kernels._triton import tl, triton


@triton.jit
def _noise_blend_kernel(z_ptr, gamma_ptr, noise_ptr, seed_ptr, out_ptr, gamma_stride, C, R, S, W,
                        z_sb, z_sc, z_sh, z_sw, n_sb, n_sc, n_sh, n_sw, o_sb, o_sc, o_sh, o_sw,
                        NOISE_IN_KERNEL: tl.constexpr, MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    gamma = tl.load(gamma_ptr + (rows // S) * gamma_stride, mask=rows < R).to(COMPUTE_DTYPE)[None, :]
    z = tl.load(z_ptr + tile_offsets(channels, rows, S, W, z_sb, z_sc, z_sh, z_sw, MERGED_HW), mask=mask)
    noise = noise_tile(noise_ptr, seed_ptr, channels, rows, mask, C, S, W, n_sb, n_sc, n_sh, n_sw,
                       MERGED_HW, NOISE_IN_KERNEL, COMPUTE_DTYPE)
    out = gamma * z.to(COMPUTE_DTYPE) + (1.0 - gamma) * noise
    out_offsets = tile_offsets(channels, rows, S, W, o_sb, o_sc, o_sh, o_sw, MERGED_HW)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_blend_backward_kernel(grad_ptr, z_ptr, gamma_ptr, noise_ptr, seed_ptr, dz_ptr, dnoise_ptr,
                                 dgamma_partial_ptr, gamma_stride, C, R, S, W,
                                 g_sb, g_sc, g_sh, g_sw, z_sb, z_sc, z_sh, z_sw,
                                 n_sb, n_sc, n_sh, n_sw, dz_sb, dz_sc, dz_sh, dz_sw, dn_sb, dn_sc, dn_sh, dn_sw,
                                 NOISE_IN_KERNEL: tl.constexpr, NOISE_GRAD: tl.constexpr, MERGED_HW: tl.constexpr,
                                 COMPUTE_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    gamma = tl.load(gamma_ptr + (rows // S) * gamma_stride, mask=rows < R).to(COMPUTE_DTYPE)[None, :]
    g_offsets = tile_offsets(channels, rows, S, W, g_sb, g_sc, g_sh, g_sw, MERGED_HW)
    grad = tl.load(grad_ptr + g_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    z_offsets = tile_offsets(channels, rows, S, W, z_sb, z_sc, z_sh, z_sw, MERGED_HW)
    z = tl.load(z_ptr + z_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    noise = noise_tile(noise_ptr, seed_ptr, channels, rows, mask, C, S, W, n_sb, n_sc, n_sh, n_sw,
                       MERGED_HW, NOISE_IN_KERNEL, COMPUTE_DTYPE)
    dz_offsets = tile_offsets(channels, rows, S, W, dz_sb, dz_sc, dz_sh, dz_sw, MERGED_HW)
    tl.store(dz_ptr + dz_offsets, (gamma * grad).to(dz_ptr.dtype.element_ty), mask=mask)
    if NOISE_GRAD:
        dn_offsets = tile_offsets(channels, rows, S, W, dn_sb, dn_sc, dn_sh, dn_sw, MERGED_HW)
        tl.store(dnoise_ptr + dn_offsets, ((1.0 - gamma) * grad).to(dnoise_ptr.dtype.element_ty), mask=mask)
    # A tile may span several samples, so the partials are per (channel block, row): a (channel blocks × R)
    # buffer whose sum over channel blocks and each sample's rows gives dγ.
    tl.store(dgamma_partial_ptr + tl.program_id(1).to(tl.int64) * R + rows, tl.sum(grad * (z - noise), axis=0),
             mask=rows < R)


# ---- launchers --------------------------------------------------------------------------------------------------
def _forward_plan(z, gamma, noise):
    out = output_layout(z)
    return plan_elementwise([z, noise, out], tiles_over=out, outputs=(out,), dtype=z.dtype,
                            extras=(gamma.stride(0),), constexprs={"NOISE_IN_KERNEL": noise is None})


_FORWARD_PLANS = SignatureCache(_forward_plan)


def _launch_forward(z, gamma, noise, seed, plan=None):
    """The blend of 4-D z; ε is ``noise``, or drawn from the seed tensor when noise is None.  ``plan``: the
    caller's, else looked up for these tensors."""
    if plan is None:
        plan = _FORWARD_PLANS(z, gamma, noise)
    out = allocate(plan.outputs[0])
    _noise_blend_kernel[plan.grid](z, gamma, noise if noise is not None else z, seed if seed is not None else gamma,
                                   out, *plan.args, **plan.options)
    return out


def _backward_plan(grad, z, gamma, noise, noise_grad):
    grads = output_layout(grad)
    return plan_elementwise([grad, z, noise, grads, grads if noise_grad else None], tiles_over=grads,
                            outputs=(grads,), dtype=z.dtype, extras=(gamma.stride(0),),
                            constexprs={"NOISE_IN_KERNEL": noise is None, "NOISE_GRAD": noise_grad})


_BACKWARD_PLANS = SignatureCache(_backward_plan)


def _launch_backward(grad, z, gamma, noise, seed, noise_grad):
    plan = _BACKWARD_PLANS(grad, z, gamma, noise, noise_grad)
    dz = allocate(plan.outputs[0])
    dnoise = allocate(plan.outputs[0]) if noise_grad else None
    batch, _, height, width = z.shape
    partials = new_output((plan.grid[1], batch * height * width), like=z, dtype=accumulation_dtype(z.dtype))
    _noise_blend_backward_kernel[plan.grid](
        grad, z, gamma, noise if noise is not None else z, seed if seed is not None else gamma, dz,
        dnoise if noise_grad else dz, partials, *plan.args, **plan.options)
    dgamma = partials.view(plan.grid[1], batch, height * width).sum(dim=(0, 2)).to(gamma.dtype)
    return dz, dgamma, dnoise if noise_grad else grad.new_empty(0)


# ---- autograd, shared by the traced op and the eager Function: ``backward`` is the op or the launcher -----------
def _save_for_backward(ctx, inputs, output):
    z, gamma, noise, seed = inputs
    ctx.save_for_backward(z, gamma, noise, seed)
    ctx.noise_grad = noise is not None and ctx.needs_input_grad[2]


def _input_grads(backward, ctx, grad):
    z, gamma, noise, seed = ctx.saved_tensors
    dz, dgamma, dnoise = backward(grad, z, gamma, noise, seed, ctx.noise_grad)
    return dz, dgamma, dnoise if ctx.noise_grad else None, None


# ---- operators (torch.library: torch.compile and opcheck) -----------------------------------------------------
@torch.library.custom_op("diffkd::noise_blend", mutates_args=())
def _noise_blend_op(z: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None,
                    seed: torch.Tensor | None) -> torch.Tensor:
    return _launch_forward(z, gamma, noise, seed)


@_noise_blend_op.register_fake
def _(z, gamma, noise, seed):
    return new_output_like(z)


@torch.library.custom_op("diffkd::noise_blend_backward", mutates_args=())
def _noise_blend_backward_op(grad: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None,
                             seed: torch.Tensor | None,
                             noise_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dγ, dε); dε is an empty tensor unless ``noise_grad``."""
    return _launch_backward(grad, z, gamma, noise, seed, noise_grad)


@_noise_blend_backward_op.register_fake
def _(grad, z, gamma, noise, seed, noise_grad):
    return new_output_like(grad), gamma.new_empty(gamma.shape), \
        new_output_like(grad) if noise_grad else grad.new_empty(0)


_noise_blend_op.register_autograd(functools.partial(_input_grads, _noise_blend_backward_op),
                                  setup_context=_save_for_backward)

# ---- eager autograd (no dispatcher) -----------------------------------------------------------------------------
_EagerBlend = eager_autograd("NoiseBlend", _launch_forward, _save_for_backward,
                             functools.partial(_input_grads, _launch_backward))


# ---- public API -------------------------------------------------------------------------------------------------
def _check_inputs(z: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None):
    check_noise_shape("noise_blend", z, "z", noise)
    check_same_device_and_dtype("noise_blend", z=z, gamma=gamma, **({"noise": noise} if noise is not None else {}))
    as_bchw(z, "z", "noise_blend")
    if gamma.shape != (z.shape[0],):
        raise ValueError(f"noise_blend: gamma must hold one value per sample, shape ({z.shape[0]},), "
                         f"got {tuple(gamma.shape)}")
    return backend_traits(z, gamma, noise)


_CALLS = checked_calls(_check_inputs)


def noise_blend(z: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor | None = None, seed=None, *,
                backend: str | None = None) -> torch.Tensor:
    """Adaptive noise matching: γ_b·z + (1−γ_b)·ε for (B, C[, H[, W]]) tensors of any layout, γ of shape (B,).

    ε is ``noise`` when given (then ``seed`` is ignored), else standard normal noise drawn from ``seed`` — a
    Python int or a one-element int64 tensor; see ``kernels._noise`` for seeds under CUDA graphs.  The "torch" and
    "triton" backends draw different noise for the same seed.  The output keeps z's memory format.
    Gradients: dz = γ·g, dγ_b = Σ g·(z − ε), dε = (1−γ)·g; in-kernel noise is regenerated, never stored.
    """
    check_noise_source("noise_blend", "z", noise, seed)
    call = _CALLS(z, gamma, noise)
    if choose_backend(backend, "noise_blend", call.traits) == "torch":
        return reference.noise_blend(z, gamma, noise, seed)
    z4 = as_bchw(z, "z", "noise_blend")
    noise4 = as_bchw(noise, "noise", "noise_blend") if noise is not None else None
    seed_buffer = seed_tensor(seed, z.device) if noise is None else None
    if torch.compiler.is_compiling():
        out = _noise_blend_op(z4, gamma, noise4, seed_buffer)
    else:
        out = _EagerBlend.apply(z4, gamma, noise4, seed_buffer, call.forward_plan(_forward_plan, z4, gamma, noise4))
    return out if z.dim() == 4 else out.reshape(z.shape)
