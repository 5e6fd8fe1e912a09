"""1×1-convolution GEMM kernels (kernels/conv1x1.py) in Triton's interpreter against the float64 reference.

The interpreter's tiles are 64 rows × 32 output channels × 32 input channels, so C_in = 40 runs two K steps and
C_out = 70 three column blocks; with few output tiles the weight gradient is split over row ranges.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import LAYOUTS, LOW_PRECISION, check_against_fp64, make, poisoned_outputs  # noqa: F401
from kernels import conv1x1
from kernels._triton import tl, triton
from kernels.conv1x1 import _round_to_tf32

conv1x1_module = importlib.import_module("kernels.conv1x1")  # the package's attribute is the function


def _triton_conv(x, weight, *bias):
    return conv1x1(x, weight, *bias, backend="triton")


def _reference_conv(x, weight, *bias):
    return F.conv2d(x, weight, *bias)


def _weight(out_channels, in_channels, dtype=torch.float32):
    return (torch.randn(out_channels, in_channels, 1, 1) / in_channels ** 0.5).to(dtype).requires_grad_()


def _bias(out_channels, dtype=torch.float32):
    return torch.randn(out_channels, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_conv2d_in_every_layout(layout):
    x = make((2, 40, 5, 7), layout, requires_grad=True)
    check_against_fp64(_triton_conv, _reference_conv, [x, _weight(70, 40), _bias(70)])


def test_without_bias_and_with_a_channels_last_weight():
    x = make((2, 40, 5, 7), "channels_last", requires_grad=True)
    weight = _weight(24, 40).detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    check_against_fp64(_triton_conv, _reference_conv, [x, weight])


def test_weight_gradient_split_over_row_ranges():
    # One output tile and 128 rows: four row ranges, each its own partial, summed deterministically.
    assert conv1x1_module._row_split(128, 1, torch.device("cpu")) == (4, 32)
    x = make((2, 6, 8, 8), "channels_last", requires_grad=True)
    check_against_fp64(_triton_conv, _reference_conv, [x, _weight(6, 6), _bias(6)])
    weight, bias = _weight(6, 6), _bias(6)
    upstream = torch.randn(2, 6, 8, 8)
    grads = [torch.autograd.grad((conv1x1(x, weight, bias, backend="triton") * upstream).sum(), [weight, bias])
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("shape", [(3, 40, 1, 1), (40, 5, 3)], ids=["1x1", "unbatched"])
def test_maps_without_space_and_unbatched_input(shape):
    check_against_fp64(_triton_conv, _reference_conv, [make(shape, requires_grad=True), _weight(70, 40), _bias(70)])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_within_twice_torch_error(dtype, layout):
    x = make((2, 40, 5, 7), layout, dtype, requires_grad=True)
    check_against_fp64(_triton_conv, _reference_conv, [x, _weight(70, 40, dtype), _bias(70, dtype)])


def test_output_keeps_the_input_memory_format():
    weight = _weight(8, 6)
    assert conv1x1(make((2, 6, 3, 4), "channels_last"), weight, backend="triton").is_contiguous(
        memory_format=torch.channels_last)
    assert conv1x1(make((2, 6, 3, 4), "sliced"), weight, backend="triton").is_contiguous()


def test_autocast_casts_like_conv2d():
    x, weight, bias = make((2, 6, 3, 4)), _weight(8, 6), _bias(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv1x1(x, weight, bias, backend="triton")
        expected = F.conv2d(x, weight, bias)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_later_calls_launch_the_chosen_config_without_the_autotuner(monkeypatch):
    x, weight, bias = make((2, 6, 3, 4), "channels_last", requires_grad=True), _weight(8, 6), _bias(8)
    first = conv1x1(x, weight, bias, backend="triton")
    first_grads = torch.autograd.grad(first.sum(), [x, weight, bias])

    def autotuner_again(*args, **kwargs):
        raise AssertionError("the autotuner ran for a signature it has already served")
    for kernel in (conv1x1_module._conv1x1_kernel, conv1x1_module._conv1x1_weight_grad_kernel):
        monkeypatch.setattr(kernel, "run", autotuner_again)
    again = conv1x1(x, weight, bias, backend="triton")
    assert torch.equal(again, first)
    for got, expected in zip(torch.autograd.grad(again.sum(), [x, weight, bias]), first_grads):
        assert torch.equal(got, expected)


def _eager_conv(x, weight, bias):
    """The eager autograd Function itself, which (unlike the public API) accepts fp64."""
    return conv1x1_module._EagerConv1x1.apply(x, weight, bias, conv1x1_module._FORWARD_PLANS(x, weight, bias))


def test_fp64_gradcheck():
    """The eager Function and the registered op compute in fp64 for fp64 inputs (the public API offers
    fp32/fp16/bf16 to Triton)."""
    x = make((2, 3, 2, 3), "channels_last", torch.float64, requires_grad=True)
    weight = _weight(4, 3, torch.float64)
    bias = _bias(4, torch.float64)
    assert torch.autograd.gradcheck(_eager_conv, (x, weight, bias), fast_mode=True)
    assert torch.autograd.gradcheck(torch.ops.diffkd.conv1x1, (x, weight, bias), fast_mode=True)


def test_opcheck():
    x, weight, bias = make((2, 5, 2, 3), "channels_last", requires_grad=True), _weight(4, 5), _bias(4)
    torch.library.opcheck(torch.ops.diffkd.conv1x1.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.diffkd.conv1x1_weight_grad.default,
                          (make((2, 4, 2, 3), "channels_last"), x.detach(), True), test_utils="test_faketensor")


@pytest.mark.parametrize("call, message", [
    (lambda: conv1x1(make((2, 6, 3, 3)), _weight(4, 5), backend="triton"), "expects 5 input channels"),
    (lambda: conv1x1(make((2, 6, 3, 3)), torch.randn(4, 6, 3, 3), backend="triton"), r"\(C_out, C_in, 1, 1\)"),
    (lambda: conv1x1(make((2, 6, 3, 3)), _weight(4, 6), torch.randn(5), backend="triton"), r"shape \(4,\)"),
    (lambda: conv1x1(make((2, 6, 3, 3)), _weight(4, 6, torch.float16), backend="triton"), "one dtype"),
    (lambda: conv1x1(torch.randn(2, 6), _weight(4, 6), backend="triton"), "unbatched"),
], ids=["channels", "kernel size", "bias", "dtype", "rank"])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@triton.jit
def _round_to_tf32_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, _round_to_tf32(tl.load(x_ptr + offsets)))


def test_tf32_operands_round_to_nearest():
    """The GPU's TF32 path rounds operands to 10 mantissa bits (ties away from zero), as cuBLAS does."""
    x = torch.cat([torch.randn(1019) * 10.0 ** torch.randint(-5, 5, (1019,)),
                   torch.tensor([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 3 * 2 ** -11, 1 + 2 ** -12, 0.0])])
    out = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x, out, N=x.numel())
    exponent = torch.floor(torch.log2(x.double().abs().clamp_min(1e-30)))
    quantum = 2.0 ** (exponent - 10)
    nearest = torch.sign(x.double()) * torch.floor(x.double().abs() / quantum + 0.5) * quantum
    torch.testing.assert_close(out.double(), nearest, rtol=0, atol=0)
    assert out[-5].item() == 1 + 2 ** -10 and out[-2].item() == 1.0
