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

import functools

import torch

from kernels import reference
from kernels._common import (SignatureCache, backend_traits, check_same_device_and_dtype, checked_calls,
                             choose_backend, eager_autograd)
from kernels._layout import (allocate, as_bchw, new_output, new_output_like, output_layout, plan_elementwise,
                             tile_coordinates, tile_offsets)
from kernels._noise import check_noise_shape, check_noise_source, noise_tile, seed_tensor
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
def _q_sample_kernel(z_ptr, t_ptr, table_ptr, noise_ptr, seed_ptr, out_ptr, t_stride, num_timesteps, C, R, S, W,
                     z_sb, z_sc, z_sh, z_sw, n_sb, n_sc, n_sh, n_sw, o_sb, o_sc, o_sh, o_sw,
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
def _q_sample_backward_kernel(grad_ptr, t_ptr, table_ptr, dz_ptr, dnoise_ptr, t_stride, num_timesteps, C, R, S, W,
                              g_sb, g_sc, g_sh, g_sw, dz_sb, dz_sc, dz_sh, dz_sw, dn_sb, dn_sc, dn_sh, dn_sw,
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
def _squared_error_kernel(pred_ptr, target_ptr, seed_ptr, partial_ptr, count, C, R, S, W,
                          p_sb, p_sc, p_sh, p_sw, t_sb, t_sc, t_sh, t_sw,
                          TARGET_IN_KERNEL: tl.constexpr, MERGED_HW: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    channels, rows, mask = tile_coordinates(C, R, BLOCK_C, BLOCK_R)
    p_offsets = tile_offsets(channels, rows, S, W, p_sb, p_sc, p_sh, p_sw, MERGED_HW)
    pred = tl.load(pred_ptr + p_offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    target = noise_tile(target_ptr, seed_ptr, channels, rows, mask, C, S, W, t_sb, t_sc, t_sh, t_sw,
                        MERGED_HW, TARGET_IN_KERNEL, COMPUTE_DTYPE)
    diff = pred - target
    # Each partial is already divided by the element count: their sum is the mean, with no division after it.
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.sum(diff * diff, axis=1), axis=0) / count)


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


# ---- launchers --------------------------------------------------------------------------------------------------
def _q_sample_plan(z0, t, table, noise):
    out = output_layout(z0)
    return plan_elementwise([z0, noise, out], tiles_over=out, outputs=(out,), dtype=z0.dtype,
                            extras=(t.stride(0), table.shape[0]), constexprs={"NOISE_IN_KERNEL": noise is None})


_Q_SAMPLE_PLANS = SignatureCache(_q_sample_plan)


def _launch_q_sample(z0, t, table, noise, seed, plan=None):
    """q-sampling of 4-D z0 (ε from ``noise`` or drawn from the seed tensor); ``plan``: the caller's, else looked
    up for these tensors."""
    if plan is None:
        plan = _Q_SAMPLE_PLANS(z0, t, table, noise)
    out = allocate(plan.outputs[0])
    _q_sample_kernel[plan.grid](z0, t, table, noise if noise is not None else z0, seed if seed is not None else t,
                                out, *plan.args, **plan.options)
    return out


def _q_sample_backward_plan(grad, t, table, noise_grad):
    grads = output_layout(grad)
    return plan_elementwise([grad, grads, grads if noise_grad else None], tiles_over=grads, outputs=(grads,),
                            dtype=grad.dtype, extras=(t.stride(0), table.shape[0]),
                            constexprs={"NOISE_GRAD": noise_grad})


_Q_SAMPLE_BACKWARD_PLANS = SignatureCache(_q_sample_backward_plan)


def _launch_q_sample_backward(grad, t, table, noise_grad):
    plan = _Q_SAMPLE_BACKWARD_PLANS(grad, t, table, noise_grad)
    dz = allocate(plan.outputs[0])
    dnoise = allocate(plan.outputs[0]) if noise_grad else None
    _q_sample_backward_kernel[plan.grid](grad, t, table, dz, dnoise if noise_grad else dz, *plan.args,
                                         **plan.options)
    return dz, dnoise if noise_grad else grad.new_empty(0)


def _loss_dtype(pred, target):
    """fp32, or fp64 when either input is fp64."""
    wide = torch.float64 in (pred.dtype, target.dtype if target is not None else None)
    return torch.float64 if wide else torch.float32


def _squared_error_plan(pred, target):
    return plan_elementwise([pred, target], tiles_over=pred, outputs=(), dtype=_loss_dtype(pred, target),
                            extras=(pred.numel(),), constexprs={"TARGET_IN_KERNEL": target is None})


_SQUARED_ERROR_PLANS = SignatureCache(_squared_error_plan)


def _launch_squared_error(pred, target, seed, plan=None):
    """mean((pred − target)²) of 4-D tensors (target drawn from the seed tensor when None); ``plan``: the
    caller's, else looked up for these tensors."""
    if plan is None:
        plan = _SQUARED_ERROR_PLANS(pred, target)
    partials = new_output((plan.grid[0] * plan.grid[1],), like=pred, dtype=_loss_dtype(pred, target))
    _squared_error_kernel[plan.grid](pred, target if target is not None else pred, seed if seed is not None else pred,
                                     partials, *plan.args, **plan.options)
    return partials.sum()


def _squared_error_backward_plan(pred, target, target_grad):
    dpred = output_layout(pred)
    dtarget = output_layout(target) if target_grad else None
    return plan_elementwise([pred, target, dpred, dtarget], tiles_over=dpred, outputs=(dpred, dtarget),
                            dtype=_loss_dtype(pred, target), extras=(pred.numel(),),
                            constexprs={"TARGET_IN_KERNEL": target is None, "TARGET_GRAD": target_grad})


_SQUARED_ERROR_BACKWARD_PLANS = SignatureCache(_squared_error_backward_plan)


def _launch_squared_error_backward(grad, pred, target, seed, target_grad):
    plan = _SQUARED_ERROR_BACKWARD_PLANS(pred, target, target_grad)
    dpred = allocate(plan.outputs[0])
    dtarget = allocate(plan.outputs[1]) if target_grad else None
    _squared_error_backward_kernel[plan.grid](
        grad, pred, target if target is not None else pred, seed if seed is not None else pred, dpred,
        dtarget if target_grad else dpred, *plan.args, **plan.options)
    return dpred, dtarget if target_grad else pred.new_empty(0)


# ---- autograd, shared by the traced ops and the eager Functions: ``backward`` is the op or the launcher ---------
def _q_sample_setup(ctx, inputs, output):
    _, t, alphas_cumprod, noise, _ = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.noise_grad = noise is not None and ctx.needs_input_grad[3]


def _q_sample_input_grads(backward, ctx, grad):
    t, alphas_cumprod = ctx.saved_tensors
    dz0, dnoise = backward(grad, t, alphas_cumprod, ctx.noise_grad)
    return dz0, None, None, dnoise if ctx.noise_grad else None, None


def _squared_error_setup(ctx, inputs, output):
    pred, target, seed = inputs
    ctx.save_for_backward(pred, target, seed)
    ctx.target_grad = target is not None and ctx.needs_input_grad[1]


def _squared_error_input_grads(backward, ctx, grad):
    pred, target, seed = ctx.saved_tensors
    dpred, dtarget = backward(grad, pred, target, seed, ctx.target_grad)
    return dpred, dtarget if ctx.target_grad else None, None


# ---- operators (torch.library: torch.compile and opcheck) -----------------------------------------------------
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


_q_sample_op.register_autograd(functools.partial(_q_sample_input_grads, _q_sample_backward_op),
                               setup_context=_q_sample_setup)


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


_squared_error_mean_op.register_autograd(functools.partial(_squared_error_input_grads,
                                                           _squared_error_mean_backward_op),
                                         setup_context=_squared_error_setup)

# ---- eager autograd (no dispatcher) -----------------------------------------------------------------------------
_EagerQSample = eager_autograd("QSample", _launch_q_sample, _q_sample_setup,
                               functools.partial(_q_sample_input_grads, _launch_q_sample_backward))
_EagerSquaredError = eager_autograd("SquaredErrorMean", _launch_squared_error, _squared_error_setup,
                                    functools.partial(_squared_error_input_grads, _launch_squared_error_backward))


# ---- public API -------------------------------------------------------------------------------------------------
def _check_q_sample_inputs(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                           noise: torch.Tensor | None):
    check_noise_shape("q_sample", z0, "z0", noise)
    check_same_device_and_dtype("q_sample", z0=z0, **({"noise": noise} if noise is not None else {}))
    as_bchw(z0, "z0", "q_sample")
    if t.shape != (z0.shape[0],) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"q_sample: t must hold one integer timestep per sample, shape ({z0.shape[0]},), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if t.device != z0.device:
        raise ValueError(f"q_sample: t must be on z0's device {z0.device}, got {t.device}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"q_sample: alphas_cumprod must be a 1-D float32 table (never half precision: ᾱ_0 = "
                         f"0.9999 rounds to 1.0 in fp16), got {alphas_cumprod.dtype} of shape "
                         f"{tuple(alphas_cumprod.shape)}")
    return backend_traits(z0, noise)


_Q_SAMPLE_CALLS = checked_calls(_check_q_sample_inputs)


def q_sample(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None,
             seed=None, *, backend: str | None = None) -> torch.Tensor:
    """Forward diffusion √ᾱ_t·z0 + √(1−ᾱ_t)·ε with one integer timestep per sample (t of shape (B,)).

    ᾱ is read from the float32 (or float64) table ``alphas_cumprod``, kept on z0's device to avoid a copy per
    call.  ε is ``noise`` when given, else drawn in-kernel from ``seed`` (``kernels._noise``); the "torch" backend
    draws different noise for the same seed.  A timestep outside the table gives NaN for its sample on the Triton
    backend (an indexing error on the torch backend).  Gradients: dz0 = √ᾱ_t·g, dε = √(1−ᾱ_t)·g.
    """
    check_noise_source("q_sample", "z0", noise, seed)
    call = _Q_SAMPLE_CALLS(z0, t, alphas_cumprod, noise)
    if alphas_cumprod.requires_grad:
        raise ValueError("q_sample: alphas_cumprod is a constant schedule table and gets no gradient; detach it")
    if choose_backend(backend, "q_sample", call.traits) == "torch":
        return reference.q_sample(z0, t, alphas_cumprod, noise, seed)
    z4 = as_bchw(z0, "z0", "q_sample")
    noise4 = as_bchw(noise, "noise", "q_sample") if noise is not None else None
    seed_buffer = seed_tensor(seed, z0.device) if noise is None else None
    table = alphas_cumprod.to(z0.device)
    if torch.compiler.is_compiling():
        out = _q_sample_op(z4, t, table, noise4, seed_buffer)
    else:
        out = _EagerQSample.apply(z4, t, table, noise4, seed_buffer,
                                  call.forward_plan(_q_sample_plan, z4, t, table, noise4))
    return out if z0.dim() == 4 else out.reshape(z0.shape)


def _check_squared_error_inputs(pred: torch.Tensor, target: torch.Tensor | None):
    if target is not None and target.shape != pred.shape:
        raise ValueError(f"squared_error_mean: pred and target must have one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if target is not None and target.device != pred.device:
        raise ValueError(f"squared_error_mean: pred and target must be on one device, got {pred.device} and "
                         f"{target.device}")
    as_bchw(pred, "pred", "squared_error_mean")
    return backend_traits(pred, target)


_SQUARED_ERROR_CALLS = checked_calls(_check_squared_error_inputs)


def squared_error_mean(pred: torch.Tensor, target: torch.Tensor | None = None, seed=None, *,
                       backend: str | None = None) -> torch.Tensor:
    """mean((pred − target)²) as a float32 scalar (float64 for float64 inputs), for (B, C[, H[, W]]) tensors.

    pred and target may differ in dtype and layout (both are read in fp32).  With target=None the target is the
    noise that ``q_sample`` draws for the same ``seed`` and shape on the same backend, regenerated rather than
    stored.  Gradients: dpred = 2·(pred − target)·g/N and dtarget = −dpred.
    """
    check_noise_source("squared_error_mean", "pred", target, seed)
    call = _SQUARED_ERROR_CALLS(pred, target)
    if choose_backend(backend, "squared_error_mean", call.traits) == "torch":
        return reference.squared_error_mean(pred, target, seed)
    pred4 = as_bchw(pred, "pred", "squared_error_mean")
    target4 = as_bchw(target, "target", "squared_error_mean") if target is not None else None
    seed_buffer = seed_tensor(seed, pred.device) if target is None else None
    if torch.compiler.is_compiling():
        return _squared_error_mean_op(pred4, target4, seed_buffer)
    return _EagerSquaredError.apply(pred4, target4, seed_buffer,
                                    call.forward_plan(_squared_error_plan, pred4, target4))
