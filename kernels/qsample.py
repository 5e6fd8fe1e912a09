"""q-sampling with per-sample timesteps, and the fused squared-error mean of the DiffKD losses.

``q_sample`` computes √ᾱ_t·z0 + √(1−ᾱ_t)·ε in one pass: the kernel gathers each row's timestep and ᾱ_t from the
float32 table and draws ε in-kernel when no noise is given; its backward is one scaling pass (nothing saved but
t).  A timestep outside the table makes that sample's output NaN instead of reading out of bounds (checking on
the host would need a device sync, which CUDA graphs forbid).

``squared_error_mean`` reads pred and target once and reduces (pred − target)² in two deterministic stages (one
fp32 partial per program, then a sum).  With target=None the target is the noise ``q_sample`` drew for the same
seed and shape, regenerated in the kernel, so the diffusion loss mean((Φ(z_t, t) − ε)²) never materialises ε.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels._common import check_same_device_and_dtype, resolve_backend
from kernels._layout import (as_bchw, check_index_range, compute_dtype, matrix_sizes, new_output, new_output_like,
                             optional_strides, plan_tiles, spatially_mergeable, strides_bchw, tile_coordinates,
                             tile_offsets)
from kernels._noise import check_noise_source, noise_tile, seed_tensor
from kernels._triton import tl, triton

@triton.jit
def _diffusion_coefficients(t_ptr, table_ptr, rows, R, S, t_stride, num_timesteps):
    """Per row (of its sample's timestep): √ᾱ_t and √(1−ᾱ_t) as [1, BLOCK_R] fp32; NaN for t outside the table."""
    row_mask = rows < R
    t = tl.load(t_ptr + (rows // S) * t_stride, mask=row_mask, other=0)
    valid = (t >= 0) & (t < num_timesteps)
    alpha_bar = tl.load(table_ptr + tl.where(valid, t, 0), mask=row_mask, other=0.0).to(tl.float32)
    # sqrt(-1) is the NaN that marks an invalid timestep.
    signal = tl.sqrt(tl.where(valid, alpha_bar, -1.0))
    noise_scale = tl.sqrt(tl.where(valid, 1.0 - alpha_bar, -1.0))
    return signal[None, :], noise_scale[None, :]


@triton.jit
def _q_sample_kernel(z_ptr, t_ptr, table_ptr, noise_ptr, seed_ptr, out_ptr, C, R, S, W, num_timesteps,
                     z_sb, z_sc, z_sh, z_sw, t_stride, n_sb, n_sc, n_sh, n_sw, o_sb, o_sc, o_sh, o_sw,
                     NOISE_IN_KERNEL: tl.constexpr, MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    signal, noise_scale = _diffusion_coefficients(t_ptr, table_ptr, rows, R, S, t_stride, num_timesteps)
    z = tl.load(z_ptr + tile_offsets(channels, rows, S, W, z_sb, z_sc, z_sh, z_sw, MERGED_HW), mask=mask)
    noise = noise_tile(noise_ptr, seed_ptr, channels, rows, mask, C, S, W, n_sb, n_sc, n_sh, n_sw,
                       MERGED_HW, NOISE_IN_KERNEL, COMPUTE_DTYPE)
    out = signal.to(COMPUTE_DTYPE) * z.to(COMPUTE_DTYPE) + noise_scale.to(COMPUTE_DTYPE) * noise
    out_offsets = tile_offsets(channels, rows, S, W, o_sb, o_sc, o_sh, o_sw, MERGED_HW)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_backward_kernel(grad_ptr, t_ptr, table_ptr, dz_ptr, dnoise_ptr, C, R, S, W, num_timesteps,
                              g_sb, g_sc, g_sh, g_sw, t_stride, dz_sb, dz_sc, dz_sh, dz_sw, dn_sb, dn_sc, dn_sh, dn_sw,
                              NOISE_GRAD: tl.constexpr, MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    signal, noise_scale = _diffusion_coefficients(t_ptr, table_ptr, rows, R, S, t_stride, num_timesteps)
    g_offsets = tile_offsets(channels, rows, S, W, g_sb, g_sc, g_sh, g_sw, MERGED_HW)
    grad = tl.load(grad_ptr + g_offsets, mask=mask).to(COMPUTE_DTYPE)
    dz_offsets = tile_offsets(channels, rows, S, W, dz_sb, dz_sc, dz_sh, dz_sw, MERGED_HW)
    tl.store(dz_ptr + dz_offsets, (signal.to(COMPUTE_DTYPE) * grad).to(dz_ptr.dtype.element_ty), mask=mask)
    if NOISE_GRAD:
        dn_offsets = tile_offsets(channels, rows, S, W, dn_sb, dn_sc, dn_sh, dn_sw, MERGED_HW)
        tl.store(dnoise_ptr + dn_offsets, (noise_scale.to(COMPUTE_DTYPE) * grad).to(dnoise_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _squared_error_kernel(pred_ptr, target_ptr, seed_ptr, partial_ptr, C, R, S, W,
                          p_sb, p_sc, p_sh, p_sw, t_sb, t_sc, t_sh, t_sw,
                          TARGET_IN_KERNEL: tl.constexpr, MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    p_offsets = tile_offsets(channels, rows, S, W, p_sb, p_sc, p_sh, p_sw, MERGED_HW)
    pred = tl.load(pred_ptr + p_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    target = noise_tile(target_ptr, seed_ptr, channels, rows, mask, C, S, W, t_sb, t_sc, t_sh, t_sw,
                        MERGED_HW, TARGET_IN_KERNEL, COMPUTE_DTYPE)
    diff = pred - target
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(diff * diff, axis=1), axis=0))


@triton.jit
def _squared_error_backward_kernel(grad_ptr, pred_ptr, target_ptr, seed_ptr, dpred_ptr, dtarget_ptr, count,
                                   C, R, S, W, p_sb, p_sc, p_sh, p_sw, t_sb, t_sc, t_sh, t_sw,
                                   dp_sb, dp_sc, dp_sh, dp_sw, dt_sb, dt_sc, dt_sh, dt_sw,
                                   TARGET_IN_KERNEL: tl.constexpr, TARGET_GRAD: tl.constexpr,
                                   MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                                   BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    scale = 2.0 * tl.load(grad_ptr).to(COMPUTE_DTYPE) / count
    p_offsets = tile_offsets(channels, rows, S, W, p_sb, p_sc, p_sh, p_sw, MERGED_HW)
    pred = tl.load(pred_ptr + p_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    target = noise_tile(target_ptr, seed_ptr, channels, rows, mask, C, S, W, t_sb, t_sc, t_sh, t_sw,
                        MERGED_HW, TARGET_IN_KERNEL, COMPUTE_DTYPE)
    dpred = scale * (pred - target)
    dp_offsets = tile_offsets(channels, rows, S, W, dp_sb, dp_sc, dp_sh, dp_sw, MERGED_HW)
    tl.store(dpred_ptr + dp_offsets, dpred.to(dpred_ptr.dtype.element_ty), mask=mask)
    if TARGET_GRAD:
        dt_offsets = tile_offsets(channels, rows, S, W, dt_sb, dt_sc, dt_sh, dt_sw, MERGED_HW)
        tl.store(dtarget_ptr + dt_offsets, (-dpred).to(dtarget_ptr.dtype.element_ty), mask=mask)


def _present(*tensors):
    return [t for t in tensors if t is not None]


def _launch_q_sample(z0, t, table, noise, seed):
    out = new_output_like(z0)
    merged = spatially_mergeable(z0, out, *_present(noise))
    plan = plan_tiles(out)
    _q_sample_kernel[plan.grid](
        z0, t, table, noise if noise is not None else z0, seed if seed is not None else t, out,
        *matrix_sizes(z0), table.shape[0],
        *strides_bchw(z0, merged), t.stride(0), *optional_strides(noise, merged), *strides_bchw(out, merged),
        NOISE_IN_KERNEL=noise is None, MERGED_HW=merged, COMPUTE_DTYPE=compute_dtype(z0.dtype),
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, num_warps=plan.num_warps)
    return out


def _launch_q_sample_backward(grad, t, table, noise_grad):
    dz = new_output_like(grad)
    dnoise = new_output_like(grad) if noise_grad else None
    merged = spatially_mergeable(grad, dz, *_present(dnoise))
    plan = plan_tiles(dz)
    _q_sample_backward_kernel[plan.grid](
        grad, t, table, dz, dnoise if noise_grad else dz, *matrix_sizes(grad), table.shape[0],
        *strides_bchw(grad, merged), t.stride(0), *strides_bchw(dz, merged), *optional_strides(dnoise, merged),
        NOISE_GRAD=noise_grad, MERGED_HW=merged, COMPUTE_DTYPE=compute_dtype(grad.dtype),
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, num_warps=plan.num_warps)
    return dz, dnoise if noise_grad else grad.new_empty(0)


def _loss_dtype(pred, target):
    """fp32, or fp64 when either input is fp64."""
    wide = torch.float64 in (pred.dtype, target.dtype if target is not None else None)
    return torch.float64 if wide else torch.float32


def _launch_squared_error(pred, target, seed):
    merged = spatially_mergeable(pred, *_present(target))
    plan = plan_tiles(pred)
    dtype = _loss_dtype(pred, target)
    partials = new_output((plan.grid[0] * plan.grid[1],), like=pred, dtype=dtype)
    _squared_error_kernel[plan.grid](
        pred, target if target is not None else pred, seed if seed is not None else pred, partials,
        *matrix_sizes(pred), *strides_bchw(pred, merged), *optional_strides(target, merged),
        TARGET_IN_KERNEL=target is None, MERGED_HW=merged, COMPUTE_DTYPE=compute_dtype(dtype),
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, num_warps=plan.num_warps)
    return partials.sum() / pred.numel()


def _launch_squared_error_backward(grad, pred, target, seed, target_grad):
    dpred = new_output_like(pred)
    dtarget = new_output_like(target) if target_grad else None
    merged = spatially_mergeable(pred, dpred, *_present(target, dtarget))
    plan = plan_tiles(dpred)
    _squared_error_backward_kernel[plan.grid](
        grad, pred, target if target is not None else pred, seed if seed is not None else pred, dpred,
        dtarget if target_grad else dpred, pred.numel(), *matrix_sizes(pred),
        *strides_bchw(pred, merged), *optional_strides(target, merged), *strides_bchw(dpred, merged),
        *optional_strides(dtarget, merged),
        TARGET_IN_KERNEL=target is None, TARGET_GRAD=target_grad, MERGED_HW=merged,
        COMPUTE_DTYPE=compute_dtype(_loss_dtype(pred, target)), BLOCK_C=plan.block_c, BLOCK_R=plan.block_r,
        num_warps=plan.num_warps)
    return dpred, dtarget if target_grad else pred.new_empty(0)


# ---- operators (torch.library: eager, opcheck, torch.compile) -------------------------------------------------
@torch.library.custom_op("diffkd::q_sample", mutates_args=())
def _q_sample_op(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                 seed: torch.Tensor | None) -> torch.Tensor:
    return _launch_q_sample(z0, t, alphas_cumprod, noise, seed)


@_q_sample_op.register_fake
def _(z0, t, alphas_cumprod, noise, seed):
    return new_output_like(z0)


@torch.library.custom_op("diffkd::q_sample_backward", mutates_args=())
def _q_sample_backward_op(grad: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                          noise_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz0, dε); dε is an empty tensor unless ``noise_grad``."""
    return _launch_q_sample_backward(grad, t, alphas_cumprod, noise_grad)


@_q_sample_backward_op.register_fake
def _(grad, t, alphas_cumprod, noise_grad):
    return new_output_like(grad), new_output_like(grad) if noise_grad else grad.new_empty(0)


def _q_sample_setup(ctx, inputs, output):
    _, t, alphas_cumprod, noise, _ = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.noise_grad = noise is not None and ctx.needs_input_grad[3]


def _q_sample_backward(ctx, grad):
    t, alphas_cumprod = ctx.saved_tensors
    dz0, dnoise = torch.ops.diffkd.q_sample_backward(grad, t, alphas_cumprod, ctx.noise_grad)
    return dz0, None, None, dnoise if ctx.noise_grad else None, None


_q_sample_op.register_autograd(_q_sample_backward, setup_context=_q_sample_setup)


@torch.library.custom_op("diffkd::squared_error_mean", mutates_args=())
def _squared_error_mean_op(pred: torch.Tensor, target: torch.Tensor | None,
                           seed: torch.Tensor | None) -> torch.Tensor:
    return _launch_squared_error(pred, target, seed)


@_squared_error_mean_op.register_fake
def _(pred, target, seed):
    return pred.new_empty((), dtype=_loss_dtype(pred, target))


@torch.library.custom_op("diffkd::squared_error_mean_backward", mutates_args=())
def _squared_error_mean_backward_op(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor | None,
                                    seed: torch.Tensor | None,
                                    target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpred, dtarget); dtarget is an empty tensor unless ``target_grad``."""
    return _launch_squared_error_backward(grad, pred, target, seed, target_grad)


@_squared_error_mean_backward_op.register_fake
def _(grad, pred, target, seed, target_grad):
    return new_output_like(pred), new_output_like(target) if target_grad else pred.new_empty(0)


def _squared_error_setup(ctx, inputs, output):
    pred, target, seed = inputs
    ctx.save_for_backward(pred, target, seed)
    ctx.target_grad = target is not None and ctx.needs_input_grad[1]


def _squared_error_backward(ctx, grad):
    pred, target, seed = ctx.saved_tensors
    dpred, dtarget = torch.ops.diffkd.squared_error_mean_backward(grad, pred, target, seed, ctx.target_grad)
    return dpred, dtarget if ctx.target_grad else None, None


_squared_error_mean_op.register_autograd(_squared_error_backward, setup_context=_squared_error_setup)


# ---- public API -------------------------------------------------------------------------------------------------
def _check_schedule(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
    if t.shape != (z0.shape[0],) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"q_sample: t must hold one integer timestep per sample, shape ({z0.shape[0]},), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != z0.device:
        raise ValueError(f"q_sample: t must be on z0's device {z0.device}, got {t.device}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"q_sample: alphas_cumprod must be a 1-D float32 table (never half precision: ᾱ_0 = "
                         f"0.9999 rounds to 1.0 in fp16), got {alphas_cumprod.dtype} of shape "
                         f"{tuple(alphas_cumprod.shape)}")
    if alphas_cumprod.requires_grad:
        raise ValueError("q_sample: alphas_cumprod is a constant schedule table and gets no gradient; detach it")


def q_sample(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None,
             seed=None, *, backend: str | None = None) -> torch.Tensor:
    """Forward diffusion √ᾱ_t·z0 + √(1−ᾱ_t)·ε with one integer timestep per sample (t of shape (B,)).

    ᾱ is read from the float32 (or float64) table ``alphas_cumprod``, kept on z0's device to avoid a copy per
    call.  ε is ``noise`` when given, else drawn in-kernel from ``seed`` (``kernels._noise``); the "torch" backend
    draws different noise for the same seed.  A timestep outside the table gives NaN for its sample on the Triton
    backend (an indexing error on the torch backend).  Gradients: dz0 = √ᾱ_t·g, dε = √(1−ᾱ_t)·g.
    """
    check_noise_source("q_sample", z0, "z0", noise, seed)
    check_same_device_and_dtype("q_sample", z0=z0, **({"noise": noise} if noise is not None else {}))
    z4 = as_bchw(z0, "z0", "q_sample")
    _check_schedule(z0, t, alphas_cumprod)
    if resolve_backend(backend, z0, *_present(noise)) == "torch":
        return reference.q_sample(z0, t, alphas_cumprod, noise, seed)
    check_index_range("q_sample", z0)
    table = alphas_cumprod.to(z0.device)
    if noise is not None:
        return _q_sample_op(z4, t, table, as_bchw(noise, "noise", "q_sample"), None).reshape(z0.shape)
    return _q_sample_op(z4, t, table, None, seed_tensor("q_sample", seed, z0.device)).reshape(z0.shape)


def squared_error_mean(pred: torch.Tensor, target: torch.Tensor | None = None, seed=None, *,
                       backend: str | None = None) -> torch.Tensor:
    """mean((pred − target)²) as a float32 scalar (float64 for float64 inputs), for (B, C[, H[, W]]) tensors.

    pred and target may differ in dtype and layout (both are read in fp32).  With target=None the target is the
    noise that ``q_sample`` draws for the same ``seed`` and shape on the same backend, regenerated rather than
    stored.  Gradients: dpred = 2·(pred − target)·g/N and dtarget = −dpred.
    """
    if target is None:
        check_noise_source("squared_error_mean", pred, "pred", None, seed)
    elif target.shape != pred.shape:
        raise ValueError(f"squared_error_mean: pred and target must have one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if target is not None and target.device != pred.device:
        raise ValueError(f"squared_error_mean: pred and target must be on one device, got {pred.device} and "
                         f"{target.device}")
    pred4 = as_bchw(pred, "pred", "squared_error_mean")
    if resolve_backend(backend, pred, *_present(target)) == "torch":
        return reference.squared_error_mean(pred, target, seed)
    check_index_range("squared_error_mean", pred)
    if target is not None:
        return _squared_error_mean_op(pred4, as_bchw(target, "target", "squared_error_mean"), None)
    return _squared_error_mean_op(pred4, None, seed_tensor("squared_error_mean", seed, pred.device))
