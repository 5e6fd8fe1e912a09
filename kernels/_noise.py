"""In-kernel Gaussian noise from a seed held in device memory.

Seeds.  Every op that can draw noise takes ``seed`` as a Python int or an integer tensor with one element.  The
kernels always read the seed from device memory (a one-element int64 tensor): a Python int becomes such a tensor
through ``torch.full`` (a fill kernel, no host-to-device copy, so it is also legal while a CUDA graph captures,
where it is frozen like any other constant), and an int64 tensor already on the data's device is used in place.
That in-place use is what CUDA graphs need: capture with a seed tensor, then advance it between replays
(``seed.add_(1)`` or ``seed.copy_(new)``); every replay reads the current value, so every replay draws new
noise.  The backward of an op saves the seed tensor (8 bytes), never the noise, and regenerates the same noise;
modifying the seed in place between a forward and its backward is caught by autograd's saved-tensor check.

Noise.  The value at logical element (b, c, s) of a (B, C, H·W) tensor is Triton's Philox ``tl.randn(seed, i)``
with i = (b·C + c)·H·W + s, the row-major index: it depends on the seed and the logical shape only, not on the
memory format, strides or tile sizes, so ``q_sample`` and ``squared_error_mean`` regenerate each other's noise
for one seed and shape, and NCHW and channels-last inputs see the same noise.  Ops that draw noise from the same
seed and shape draw the same noise: give independent draws independent seeds.  The "torch" backend draws from
``torch.Generator().manual_seed(seed)`` instead, so the two backends give different (equally distributed) noise
for the same seed.
"""
from __future__ import annotations

import torch

from kernels._layout import tile_offsets
from kernels._triton import tl, triton

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def check_seed(op: str, seed) -> None:
    """A seed is a Python int in int64 range or a one-element integer tensor."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"{op}: a seed tensor must hold one integer, got dtype {seed.dtype} and shape "
                             f"{tuple(seed.shape)}; pass e.g. torch.randint(0, 2**62, (1,), device=...)")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{op}: seed must be a Python int or a one-element integer tensor, got "
                         f"{type(seed).__name__}")
    if not INT64_MIN <= seed <= INT64_MAX:
        raise ValueError(f"{op}: seed {seed} does not fit in int64")


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """A checked seed as a one-element int64 tensor on ``device``; one already in that form is used in place."""
    if isinstance(seed, torch.Tensor):
        # In place when already int64 on ``device`` (what a CUDA graph needs); otherwise a copy.
        if seed.dtype == torch.int64 and seed.device == device:
            return seed if seed.dim() == 1 else seed.reshape(1)
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def check_noise_source(op: str, like_name: str, noise: torch.Tensor | None, seed) -> None:
    """Without explicit noise a valid seed is required (checked on every call: seeds change between calls)."""
    if noise is not None:
        return
    if seed is None:
        raise ValueError(f"{op}: pass either noise (a tensor shaped like {like_name}) or seed (an int or a "
                         "one-element int64 tensor) so the noise can be drawn in-kernel")
    check_seed(op, seed)


def check_noise_shape(op: str, like: torch.Tensor, like_name: str, noise: torch.Tensor | None) -> None:
    """Explicit noise must have the shape of ``like``."""
    if noise is not None and noise.shape != like.shape:
        raise ValueError(f"{op}: noise must have the shape of {like_name} {tuple(like.shape)}, "
                         f"got {tuple(noise.shape)}")


@triton.jit
def standard_normal(seed_ptr, channels, rows, C, S):
    """N(0, 1) noise for the [channels × rows] tile (see the module docstring for the index)."""
    seed = tl.load(seed_ptr)
    index = (channels * S)[:, None] + ((rows // S) * (C * S) + rows % S)[None, :]
    return tl.randn(seed, index)


@triton.jit
def noise_tile(noise_ptr, seed_ptr, channels, rows, mask, C, S, W, stride_b, stride_c, stride_h, stride_w,
               MERGED_HW: tl.constexpr, IN_KERNEL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The noise of one tile, read from ``noise_ptr`` or drawn from the seed; zero outside ``mask``."""
    if IN_KERNEL:
        noise = tl.where(mask, standard_normal(seed_ptr, channels, rows, C, S), 0.0)
    else:
        offsets = tile_offsets(channels, rows, S, W, stride_b, stride_c, stride_h, stride_w, MERGED_HW)
        noise = tl.load(noise_ptr + offsets, mask=mask, other=0.0)
    return noise.to(COMPUTE_DTYPE)
