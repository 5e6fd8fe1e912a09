"""How the kernels walk B×C×H×W tensors of any memory format, and the tiles of the elementwise passes.

Every tensor reaches a kernel as a base pointer plus its four strides (batch, channel, row, column), so NCHW,
channels-last, sliced and broadcast (stride-0) tensors are all read in place; nothing is made contiguous.  When
a tensor's rows and columns collapse into one spatial stride (true for NCHW, channels-last and most slices),
the kernels use that single stride, which lets Triton prove unit-stride runs and vectorise the accesses; the
general (row, column) split costs one division per tile column, never per element.

The kernels see a tensor as a matrix: channels × "rows", where row m = b·H·W + s is one position of one sample
(the GEMM's M dimension).  An elementwise pass is tiled into [BLOCK_C, BLOCK_R] tiles, long along whichever axis
is contiguous in the output (rows for NCHW, channels for channels-last); a tile may span several samples, so
per-sample values (γ, t) are gathered per row.  Grid: axis 0 = row block, axis 1 = channel block.  Reductions
write one partial per program (or per program and row) into a buffer indexed by those coordinates and are
finished by a deterministic sum — no atomics.

Tensors of 2 or 3 dims, (B, C) and (B, C, L), are handled as (B, C, 1, 1) and (B, C, L, 1) views.

Everything a launch needs besides its pointers — strides, the merged-layout decision, tiles, grid, the layouts
of the outputs — depends only on the tensors' signatures, so each op computes it once per signature
(``plan_elementwise``, cached by ``kernels._common.SignatureCache``) and then launches straight from the plan.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels import _common
from kernels._common import interpreter_enabled, memory_format_of, new_output
from kernels._triton import tl, triton

# Elements per tile: large in the interpreter, where every program costs milliseconds.
GPU_TILE_ELEMENTS = 2048
INTERPRETER_TILE_ELEMENTS = 16384


def as_bchw(t: torch.Tensor, name: str, op: str) -> torch.Tensor:
    """A 4-D view of a (B, C), (B, C, L) or (B, C, H, W) tensor; other ranks are refused."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(-1)
    if t.dim() == 2:
        return t[:, :, None, None]
    raise ValueError(f"{op}: {name} must have 2, 3 or 4 dims (B, C[, H[, W]]), got shape {tuple(t.shape)}")


def spatial_stride(t: torch.Tensor) -> int | None:
    """The one stride that walks the H×W positions of ``t`` in row-major order, or None if there is none."""
    _, _, height, width = t.shape
    stride_h, stride_w = t.stride(2), t.stride(3)
    if height == 1:
        return stride_w
    if width == 1:
        return stride_h
    return stride_w if stride_h == width * stride_w else None


def spatially_mergeable(*tensors: torch.Tensor) -> bool:
    return all(spatial_stride(t) is not None for t in tensors)


def strides_bchw(t: torch.Tensor, merged: bool) -> tuple[int, int, int, int]:
    """(batch, channel, row, column) strides; with ``merged`` the spatial stride goes in the column slot."""
    if merged:
        return t.stride(0), t.stride(1), 0, spatial_stride(t)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def optional_strides(t: torch.Tensor | None, merged: bool) -> tuple[int, int, int, int]:
    """Strides of an optional tensor; zeros stand in for one that is absent (the kernel never reads it)."""
    return strides_bchw(t, merged) if t is not None else (0, 0, 0, 0)


def matrix_sizes(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(C, R, S, W) of a 4-D tensor seen as a channels × rows matrix: R = B·H·W rows, S = H·W, W."""
    batch, channels, height, width = t.shape
    return channels, batch * height * width, height * width, width


class TilePlan(NamedTuple):
    """Launch geometry of an elementwise pass over a C × (B·H·W) matrix."""
    block_c: int
    block_r: int
    grid: tuple[int, int]
    num_warps: int


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_tiles(out: torch.Tensor) -> TilePlan:
    """Tiles for a pass that writes ``out`` (4-D); long along the axis that is contiguous in ``out``."""
    batch, channels, height, width = out.shape
    rows = batch * height * width
    budget = INTERPRETER_TILE_ELEMENTS if interpreter_enabled() else GPU_TILE_ELEMENTS
    if out.stride(1) == 1 and channels > 1:  # channels contiguous (channels-last)
        block_c = min(_next_power_of_2(channels), budget)
        block_r = max(1, min(_next_power_of_2(rows), budget // block_c))
    else:
        block_r = min(_next_power_of_2(rows), budget)
        block_c = max(1, min(_next_power_of_2(channels), budget // block_r))
    grid = (-(-rows // block_r), -(-channels // block_c))
    return TilePlan(block_c, block_r, grid, 4 if block_c * block_r <= 2048 else 8)


class OutputLayout(NamedTuple):
    """Shape, strides, dtype and device of a kernel output; duck-types as a tensor for the stride helpers."""
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def stride(self, dim: int | None = None):
        return self.strides if dim is None else self.strides[dim]


def output_layout(like: torch.Tensor, shape=None, dtype: torch.dtype | None = None) -> OutputLayout:
    """An output of ``shape`` (default: like's) in ``like``'s memory format (channels-last stays channels-last)."""
    shape = tuple(like.shape if shape is None else shape)
    strides = torch.empty(shape, device="meta", memory_format=memory_format_of(like)).stride()
    return OutputLayout(shape, strides, dtype or like.dtype, like.device)


def allocate(layout: OutputLayout) -> torch.Tensor:
    """A new output with ``layout`` (NaN-filled under ``DIFFKD_POISON_OUTPUTS``, see kernels._common)."""
    out = torch.empty_strided(layout.shape, layout.strides, dtype=layout.dtype, device=layout.device)
    return out.fill_(float("nan")) if _common.POISON_OUTPUTS else out


class ElementwisePlan(NamedTuple):
    """Everything an elementwise launch needs besides its pointers and float scalars, fixed per signature."""
    grid: tuple[int, int]
    args: tuple[int, ...]  # the kernel's integer arguments: extras, then C, R, S, W, then 4 strides per slot
    options: dict  # constexprs (MERGED_HW, COMPUTE_DTYPE, BLOCK_C, BLOCK_R and the op's own) and num_warps
    outputs: tuple[OutputLayout, ...]


def plan_elementwise(slots, *, tiles_over, outputs: tuple[OutputLayout, ...], dtype: torch.dtype, extras=(),
                     constexprs: dict | None = None) -> ElementwisePlan:
    """The plan of a pass over tensors shaped like ``tiles_over`` (4-D).

    ``slots``: in the kernel's order of stride arguments, a 4-D tensor or output layout, or None for an absent
    operand (zero strides).  Tiles follow ``tiles_over`` (the tensor written, or read when nothing is); the
    kernel computes in ``compute_dtype(dtype)``.
    """
    present = [slot for slot in slots if slot is not None]
    merged = spatially_mergeable(*present)
    tiles = plan_tiles(tiles_over)
    strides = [stride for slot in slots for stride in optional_strides(slot, merged)]
    options = {"MERGED_HW": merged, "COMPUTE_DTYPE": compute_dtype(dtype), "BLOCK_C": tiles.block_c,
               "BLOCK_R": tiles.block_r, "num_warps": tiles.num_warps, **(constexprs or {})}
    return ElementwisePlan(tiles.grid, (*extras, *matrix_sizes(tiles_over), *strides), options, outputs)


@triton.jit
def tile_coordinates(C, R, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's channel and row vectors and the in-bounds mask of its [BLOCK_C, BLOCK_R] tile."""
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (channels < C)[:, None] & (rows < R)[None, :]
    return channels, rows, mask


@triton.jit
def row_offsets(rows, S, W, stride_b, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Offsets of rows m = b·S + s (S = H·W positions, row-major) without the channel term.

    With MERGED_HW, ``stride_w`` is the tensor's one spatial stride and ``stride_h`` is unused.
    """
    positions = rows % S
    if MERGED_HW:
        spatial = positions.to(tl.int64) * stride_w
    else:
        spatial = (positions // W).to(tl.int64) * stride_h + (positions % W).to(tl.int64) * stride_w
    return (rows // S).to(tl.int64) * stride_b + spatial


@triton.jit
def tile_offsets(channels, rows, S, W, stride_b, stride_c, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Element offsets of the [channels × rows] tile."""
    per_row = row_offsets(rows, S, W, stride_b, stride_h, stride_w, MERGED_HW)
    return (channels.to(tl.int64) * stride_c)[:, None] + per_row[None, :]



def new_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A kernel output shaped like ``t`` in ``t``'s memory format (NaN-filled under the poison flag)."""
    return new_output(t.shape, like=t, dtype=dtype, memory_format=memory_format_of(t))


def compute_dtype(dtype: torch.dtype):
    """The kernels compute in fp32 (fp64 for fp64 inputs, which only the verification tests use)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of reduction partials: the kernels' compute dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
