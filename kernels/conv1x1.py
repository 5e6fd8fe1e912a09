"""1×1 convolution as a GEMM over NCHW or channels-last input, read in place through strides.

Forward: Y[m, n] = Σ_k X[m, k]·W[n, k] + bias[n], where a row m = b·H·W + s is one position of one sample and k, n
are input and output channels; the kernel reads X and writes Y through their 4-D strides (so the output keeps the
input's memory format), accumulates in fp32 and adds the bias in the epilogue.  Backward: dX is the same GEMM
with Wᵀ (a strided view, no copy); dW[n, k] = Σ_m dY[m, n]·X[m, k] is a GEMM whose reduction runs over all B·H·W
rows, split into a few row ranges when there are too few output tiles to fill the GPU, each range writing its own
fp32 partial (finished by a deterministic sum, no atomics); db = Σ_m dY[m, n] rides along in the same kernel.

Precision: fp32 inputs use TF32 tensor cores on a GPU exactly when ``torch.backends.cuda.matmul.allow_tf32`` is
set, IEEE fp32 otherwise; the operands are rounded to TF32 in the kernel (the tensor cores would truncate them),
which gives cuBLAS's TF32 error.  fp16/bf16 use tensor cores with fp32 accumulation.  Triton's interpreter
computes the products in fp32 (its half-precision ``tl.dot`` is unreliable), which is exact for bf16/fp16 products.

Backend choice: "auto" runs PyTorch (cuDNN) outside CUDA graphs and, inside them, whatever the table
``AUTO_TRITON_IN_GRAPHS`` of ``kernels._common`` says (its comment records what has been measured).  A plain 1×1
convolution with bias fuses nothing that cuDNN does not fuse already; eager timings on an H200 put cuDNN well
ahead (bf16 channels-last, B·H·W = 6272, 1024 → 256: 0.019 ms vs 0.13 ms), but those Triton calls still carried
~100 µs of host time each.  backend="triton" (or DIFFKD_BACKEND=triton) always runs the kernel.  Under autocast
the inputs are cast to the autocast dtype first, as ``F.conv2d`` does.

Configs: on a GPU the first call of each (M, N, K, dtype) benchmarks the configs below once; every later call
with the same signature launches the chosen config directly (``kernels._common.TunedLaunch``).
"""
from __future__ import annotations

import functools

import torch

from typing import NamedTuple

from kernels import reference
from kernels._common import (SignatureCache, TunedLaunch, backend_traits, check_same_device_and_dtype,
                             checked_calls, choose_backend, eager_autograd, interpreter_enabled, memory_format_of,
                             new_output)
from kernels._layout import (OutputLayout, accumulation_dtype, allocate, compute_dtype, output_layout, row_offsets,
                             spatially_mergeable, strides_bchw)
from kernels._triton import tl, triton

# The interpreter gets one config (autotuning over several fails there) and small tiles, so that the tests'
# small shapes still cross tile boundaries and run several K iterations.
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1),
] if interpreter_enabled() else [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# dW tiles are fixed (the row split is chosen from the tile count on the host); only the row block is tuned.
_WGRAD_TILE = 32 if interpreter_enabled() else 64
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1),
] if interpreter_enabled() else [
    triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=4),
]
# A row range of the dW split is a multiple of every BLOCK_M above, and at least this many rows long.
_WGRAD_ROW_GRANULE = 32 if interpreter_enabled() else 128
_WGRAD_MIN_ROWS_PER_SPLIT = 32 if interpreter_enabled() else 512


@triton.jit
def _round_to_tf32(x):
    """fp32 → the nearest TF32 value (ties away from zero, like cvt.rna.tf32): Triton's TF32 tensor-core path
    would otherwise truncate the operands, which biases the products and doubles cuBLAS's TF32 error."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.autotune(configs=_FORWARD_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _conv1x1_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, S, W,
                    x_sb, x_sc, x_sh, x_sw, w_sn, w_sk, y_sb, y_sc, y_sh, y_sw,
                    HAS_BIAS: tl.constexpr, MERGED_HW: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order: GROUP_M row blocks share each column block while it is hot in L2.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_n_blocks
    first_m_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m_block, GROUP_M)
    m_block = first_m_block + (pid % programs_per_group) % group_rows
    n_block = (pid % programs_per_group) // group_rows

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    k_range = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + row_offsets(rows, S, W, x_sb, x_sh, x_sw, MERGED_HW)[:, None] + (k_range * x_sc)[None, :]
    w_ptrs = w_ptr + (k_range * w_sk)[:, None] + (cols.to(tl.int64) * w_sn)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        k_mask = k_start + k_range < K
        x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            x_tile = x_tile.to(ACC_DTYPE)
            w_tile = w_tile.to(ACC_DTYPE)
        if ROUND_TF32:
            x_tile = _round_to_tf32(x_tile)
            w_tile = _round_to_tf32(w_tile)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K * x_sc
        w_ptrs += BLOCK_K * w_sk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)[None, :]
    y_rows = row_offsets(rows, S, W, y_sb, y_sh, y_sw, MERGED_HW)
    y_ptrs = y_ptr + y_rows[:, None] + (cols.to(tl.int64) * y_sc)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _conv1x1_weight_grad_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, M, N, K, S, W, rows_per_split,
                                g_sb, g_sc, g_sh, g_sw, x_sb, x_sc, x_sh, x_sw, dw_split_stride, dw_sn, dw_sk,
                                db_split_stride,
                                HAS_BIAS: tl.constexpr, MERGED_HW: tl.constexpr, UPCAST: tl.constexpr,
                                ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    n_block = tl.program_id(0) // num_k_blocks
    k_block = tl.program_id(0) % num_k_blocks
    split = tl.program_id(1)
    ns = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < N
    k_mask = ks < K
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    # A zero-based loop: with range(row_start, row_end, BLOCK_M), Triton 3.6's pipeliner miscompiled one
    # config (BLOCK_M 64, 4 warps, 3 stages) for NCHW input on an H200.
    for block in range(0, tl.cdiv(row_end - row_start, BLOCK_M)):
        rows = row_start + block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        g_rows = row_offsets(rows, S, W, g_sb, g_sh, g_sw, MERGED_HW)
        x_rows = row_offsets(rows, S, W, x_sb, x_sh, x_sw, MERGED_HW)
        g_tile = tl.load(g_ptr + (ns.to(tl.int64) * g_sc)[:, None] + g_rows[None, :],
                         mask=n_mask[:, None] & row_mask[None, :], other=0.0)
        x_tile = tl.load(x_ptr + x_rows[:, None] + (ks.to(tl.int64) * x_sc)[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            g_tile = g_tile.to(ACC_DTYPE)
            x_tile = x_tile.to(ACC_DTYPE)
        if HAS_BIAS:
            bias_acc += tl.sum(g_tile.to(ACC_DTYPE), axis=1)
        if ROUND_TF32:
            g_tile = _round_to_tf32(g_tile)
            x_tile = _round_to_tf32(x_tile)
        acc = tl.dot(g_tile, x_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dw_ptrs = dw_ptr + split * dw_split_stride + (ns * dw_sn)[:, None] + (ks * dw_sk)[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        # Every column block sums the same dY rows; the first one writes db.
        tl.store(db_ptr + split * db_split_stride + ns, bias_acc.to(db_ptr.dtype.element_ty),
                 mask=n_mask & (k_block == 0))


@functools.lru_cache(maxsize=None)
def _precision_constexprs(dtype: torch.dtype, tf32_allowed: bool) -> dict:
    half = dtype in (torch.float16, torch.bfloat16)
    tf32 = dtype == torch.float32 and tf32_allowed and not interpreter_enabled()
    return {"UPCAST": half and interpreter_enabled(), "ACC_DTYPE": compute_dtype(dtype),
            "INPUT_PRECISION": "tf32" if tf32 else "ieee", "ROUND_TF32": tf32}


def _precision(dtype: torch.dtype) -> dict:
    """The GEMM kernels' precision constexprs for inputs of ``dtype`` under the current TF32 setting."""
    return _precision_constexprs(dtype, dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _GemmPlan(NamedTuple):
    """One GEMM signature's launch: integer arguments, constexprs (besides precision), outputs, tuned launch."""
    args: tuple[int, ...]
    options: dict
    outputs: tuple
    launch: TunedLaunch
    splits: int = 1  # row ranges of the dW reduction


def _forward_plan(x, weight, bias):
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    y = output_layout(x, shape=(batch, out_channels, height, width))
    merged = spatially_mergeable(x, y)
    rows = batch * height * width

    def grid(config):
        return (_cdiv(rows, config["BLOCK_M"]) * _cdiv(out_channels, config["BLOCK_N"]),)

    args = (rows, out_channels, in_channels, height * width, width, *strides_bchw(x, merged), weight.stride(0),
            weight.stride(1), *strides_bchw(y, merged))
    return _GemmPlan(args, {"HAS_BIAS": bias is not None, "MERGED_HW": merged}, (y,), TunedLaunch(grid))


_FORWARD_PLANS = SignatureCache(_forward_plan)


def _launch_forward(x, weight, bias, plan=None):
    """Y = conv1x1(x, weight, bias) for 4-D x; ``plan``: the caller's, else looked up for these tensors."""
    if plan is None:
        plan = _FORWARD_PLANS(x, weight, bias)
    y = allocate(plan.outputs[0])
    plan.launch(_conv1x1_kernel, x, weight, bias if bias is not None else weight, y, *plan.args, **plan.options,
                **_precision(x.dtype))
    return y


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_split(rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(number of row ranges, rows per range) for the dW reduction: enough programs to fill the device."""
    target_programs = 4 if interpreter_enabled() else 2 * _multiprocessor_count(device.index or 0)
    splits = max(1, min(-(-target_programs // tiles), -(-rows // _WGRAD_MIN_ROWS_PER_SPLIT)))
    rows_per_split = -(-rows // splits)
    rows_per_split = -(-rows_per_split // _WGRAD_ROW_GRANULE) * _WGRAD_ROW_GRANULE
    return -(-rows // rows_per_split), rows_per_split


def _weight_grad_plan(grad, x, bias_grad):
    batch, in_channels, height, width = x.shape
    out_channels = grad.shape[1]
    rows = batch * height * width
    tiles = _cdiv(out_channels, _WGRAD_TILE) * _cdiv(in_channels, _WGRAD_TILE)
    splits, rows_per_split = _row_split(rows, tiles, x.device)
    # One range writes dW (and db) in place in the final dtype; several write fp32 partials, summed after.
    dtype = x.dtype if splits == 1 else accumulation_dtype(x.dtype)
    partial = () if splits == 1 else (splits,)
    outputs = (OutputLayout((*partial, out_channels, in_channels), (), dtype, x.device),
               OutputLayout((*partial, out_channels), (), dtype, x.device))
    merged = spatially_mergeable(grad, x)
    # dW partials are contiguous (splits, N, K): split stride N·K, row stride K, column stride 1.
    args = (rows, out_channels, in_channels, height * width, width, rows_per_split, *strides_bchw(grad, merged),
            *strides_bchw(x, merged), out_channels * in_channels, in_channels, 1, out_channels)
    options = {"HAS_BIAS": bias_grad, "MERGED_HW": merged, "BLOCK_N": _WGRAD_TILE, "BLOCK_K": _WGRAD_TILE}
    return _GemmPlan(args, options, outputs, TunedLaunch(lambda config: (tiles, splits)), splits)


_WEIGHT_GRAD_PLANS = SignatureCache(_weight_grad_plan)


def _launch_weight_grad(grad, x, bias_grad):
    plan = _WEIGHT_GRAD_PLANS(grad, x, bias_grad)
    dw_layout, db_layout = plan.outputs
    dw = new_output(dw_layout.shape, like=x, dtype=dw_layout.dtype)
    db = new_output(db_layout.shape, like=x, dtype=db_layout.dtype) if bias_grad else dw
    plan.launch(_conv1x1_weight_grad_kernel, grad, x, dw, db, *plan.args, **plan.options, **_precision(x.dtype))
    if plan.splits > 1:
        dw = dw.sum(dim=0).to(x.dtype)
        db = db.sum(dim=0).to(x.dtype) if bias_grad else db
    return dw.view(grad.shape[1], x.shape[1], 1, 1), db if bias_grad else x.new_empty(0)


# ---- autograd, shared by the traced op and the eager Function: ``forward`` and ``weight_grad`` are ops or
# launchers ------------------------------------------------------------------------------------------------------
def _conv1x1_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]


def _input_grads(forward, weight_grad, ctx, grad):
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = forward(grad, weight.transpose(0, 1), None)
    if ctx.needs_input_grad[1] or ctx.bias_grad:
        dw, db = weight_grad(grad, x, ctx.bias_grad)
    return dx, dw if ctx.needs_input_grad[1] else None, db if ctx.bias_grad else None


# ---- operators (torch.library: torch.compile and opcheck) -----------------------------------------------------
@torch.library.custom_op("diffkd::conv1x1", mutates_args=())
def _conv1x1_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _launch_forward(x, weight, bias)


@_conv1x1_op.register_fake
def _(x, weight, bias):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return new_output(shape, like=x, memory_format=memory_format_of(x))


@torch.library.custom_op("diffkd::conv1x1_weight_grad", mutates_args=())
def _conv1x1_weight_grad_op(grad: torch.Tensor, x: torch.Tensor,
                            bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db); db is an empty tensor unless ``bias_grad``."""
    return _launch_weight_grad(grad, x, bias_grad)


@_conv1x1_weight_grad_op.register_fake
def _(grad, x, bias_grad):
    dw = x.new_empty((grad.shape[1], x.shape[1], 1, 1))
    return dw, x.new_empty(grad.shape[1]) if bias_grad else x.new_empty(0)


_conv1x1_op.register_autograd(functools.partial(_input_grads, _conv1x1_op, _conv1x1_weight_grad_op),
                              setup_context=_conv1x1_setup)

# ---- eager autograd (no dispatcher) -----------------------------------------------------------------------------
_EagerConv1x1 = eager_autograd("Conv1x1", _launch_forward, _conv1x1_setup,
                               functools.partial(_input_grads, _launch_forward, _launch_weight_grad))


# ---- public API -------------------------------------------------------------------------------------------------
def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Under autocast, cast to its dtype as F.conv2d would (the custom op is invisible to autocast)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    tensors = {"x": x, "weight": weight, **({"bias": bias} if bias is not None else {})}
    check_same_device_and_dtype("conv1x1", **tensors)
    if x.dim() != 4:
        raise ValueError(f"conv1x1: x must be (B, C_in, H, W) or unbatched (C_in, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"conv1x1: weight must have shape (C_out, C_in, 1, 1), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv1x1: weight expects {weight.shape[1]} input channels, x has {x.shape[1]} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"conv1x1: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return backend_traits(x, weight, bias, int32_indexed=False)  # the GEMM indexes with 64-bit offsets


_CALLS = checked_calls(_check_inputs)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            backend: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a (C_out, C_in, 1, 1) weight, as a Triton GEMM on backend "triton".

    x is (B, C_in, H, W) in any memory format (or unbatched (C_in, H, W)); the output keeps x's memory format.
    fp32, fp16 and bf16; fp32 follows ``torch.backends.cuda.matmul.allow_tf32`` on a GPU.  Gradients to x,
    weight and bias by GEMMs.  Backend "auto" (module docstring) runs cuDNN outside CUDA graphs.
    """
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    x, weight, bias = _autocast(x, weight, bias)
    call = _CALLS(x, weight, bias)
    if choose_backend(backend, "conv1x1", call.traits) == "torch":
        out = reference.conv1x1(x, weight, bias)
    elif torch.compiler.is_compiling():
        out = _conv1x1_op(x, weight, bias)
    else:
        out = _EagerConv1x1.apply(x, weight, bias, call.forward_plan(_forward_plan, x, weight, bias))
    return out.squeeze(0) if unbatched else out
