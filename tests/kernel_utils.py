"""Shared helpers of the kernel tests: input layouts, output poisoning, small tiles, the float64 check.

Every op is checked the same way: run the Triton op on inputs of some layout, then the reference twin on float64
copies, and compare every output and every gradient (``kernels.testing.compare_with_fp64``): fp32 to ~1e-5
relative; fp16/bf16 within twice PyTorch's own low-precision error against float64, plus a small atol.
"""
from __future__ import annotations

import pytest
import torch

import kernels._common
import kernels._layout
from kernels.testing import LOW_PRECISION, compare_with_fp64, philox_normal  # noqa: F401 - re-exported

# "sliced" keeps rows and columns mergeable; "spatial_slice" and "transposed" need the general (row, column) path.
LAYOUTS = ("contiguous", "channels_last", "sliced", "spatial_slice", "transposed")


def make(shape, layout: str = "contiguous", dtype: torch.dtype = torch.float32, *,
         requires_grad: bool = False) -> torch.Tensor:
    """A standard-normal leaf tensor of ``shape`` (2-4 dims) whose strides follow ``layout``."""
    shape = tuple(shape)
    if layout == "contiguous" or len(shape) != 4:
        t = torch.randn(shape)
    elif layout == "channels_last":
        t = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        batch, channels, height, width = shape
        t = torch.randn(batch, 2 * channels, height, width)[:, ::2]
    elif layout == "spatial_slice":
        batch, channels, height, width = shape
        t = torch.randn(batch, channels, height, width + 3)[..., 1:1 + width]
    elif layout == "transposed":
        batch, channels, height, width = shape
        t = torch.randn(batch, height, channels, width).permute(0, 2, 1, 3)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert t.shape == shape
    return t.to(dtype).requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts NaN-filled, so elements a kernel fails to write show up as NaN."""
    monkeypatch.setattr(kernels._common, "POISON_OUTPUTS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny interpreter tiles, so small test tensors span many programs and the partial reductions run.

    Launch plans are cached per signature: they are dropped before the test and after it, so that no plan made
    with tiny tiles outlives it (and none made before it hides them).
    """
    kernels._common.clear_signature_caches()
    monkeypatch.setattr(kernels._layout, "INTERPRETER_TILE_ELEMENTS", 64)
    yield
    kernels._common.clear_signature_caches()


def check_against_fp64(kernel_fn, reference_fn, inputs, **bounds) -> None:
    """Every output and gradient of ``kernel_fn`` within its bound of the float64 reference (kernels.testing)."""
    failures = [r for r in compare_with_fp64(kernel_fn, reference_fn, inputs, **bounds) if not r["passed"]]
    assert not failures, f"outside the bound vs fp64: {failures}"
