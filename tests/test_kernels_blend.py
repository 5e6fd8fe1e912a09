"""Noise-blend kernels (kernels/blend.py) in Triton's interpreter against the float64 reference."""
import importlib

import pytest
import torch

from kernel_utils import (LAYOUTS, LOW_PRECISION, check_against_fp64, make, philox_normal,  # noqa: F401
                          poisoned_outputs, small_tiles)
from kernels import noise_blend, reference

blend_module = importlib.import_module("kernels.blend")

SEED = 2 ** 40 + 12345  # above 2**32, so both halves of Philox's key matter


def _gamma(batch, dtype=torch.float32):
    return torch.rand(batch, dtype=dtype).requires_grad_()


def _seeded_pair(seed, shape):
    """The Triton op with in-kernel noise, and the reference fed the oracle's copy of that noise."""
    noise = philox_normal(seed, shape)

    def triton_blend(z, gamma):
        return noise_blend(z, gamma, seed=seed, backend="triton")

    def reference_blend(z, gamma):
        return reference.noise_blend(z, gamma, noise.to(z.dtype))
    return triton_blend, reference_blend


def _triton_explicit(z, gamma, noise):
    return noise_blend(z, gamma, noise, backend="triton")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_kernel_noise_blend_matches_reference(layout):
    z = make((2, 6, 5, 7), layout, requires_grad=True)
    check_against_fp64(*_seeded_pair(SEED, z.shape), [z, _gamma(2)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_explicit_noise_blend_matches_reference(layout):
    z = make((2, 6, 5, 7), "contiguous", requires_grad=True)
    noise = make((2, 6, 5, 7), layout, requires_grad=True)
    check_against_fp64(_triton_explicit, reference.noise_blend, [z, _gamma(2), noise])


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (3, 5), (2, 3, 9)], ids=["1x1", "vector", "tokens"])
def test_maps_without_space(shape):
    z = make(shape, requires_grad=True)
    check_against_fp64(*_seeded_pair(7, shape), [z, _gamma(shape[0])])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "spatial_slice"])
def test_gamma_gradient_reduces_across_many_programs(small_tiles, layout):
    z = make((3, 5, 4, 6), layout, requires_grad=True)
    check_against_fp64(*_seeded_pair(SEED, z.shape), [z, _gamma(3)])
    check_against_fp64(_triton_explicit, reference.noise_blend, [z, _gamma(3), make(z.shape, requires_grad=True)])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_torch_error(dtype):
    z = make((2, 6, 5, 7), "channels_last", dtype, requires_grad=True)
    check_against_fp64(*_seeded_pair(SEED, z.shape), [z, _gamma(2, dtype)])
    check_against_fp64(_triton_explicit, reference.noise_blend,
                       [z, _gamma(2, dtype), make(z.shape, dtype=dtype, requires_grad=True)])


def test_noise_is_standard_normal_and_follows_the_seed():
    zeros, gamma0 = torch.zeros(4, 16, 16, 16), torch.zeros(4)
    first = noise_blend(zeros, gamma0, seed=11, backend="triton")
    assert torch.equal(first, noise_blend(zeros, gamma0, seed=11, backend="triton"))
    assert torch.equal(first, noise_blend(zeros, gamma0, seed=torch.tensor([11]), backend="triton"))
    other = noise_blend(zeros, gamma0, seed=12, backend="triton")
    assert (first - other).abs().mean() > 0.5
    assert abs(first.mean().item()) < 0.03 and abs(first.std().item() - 1) < 0.03  # 16384 samples: ~4 sigma
    assert abs(torch.corrcoef(torch.stack([first.flatten(), other.flatten()]))[0, 1].item()) < 0.04


def test_noise_does_not_depend_on_the_memory_format():
    z = make((2, 6, 5, 7))
    gamma = torch.rand(2)
    nchw = noise_blend(z, gamma, seed=3, backend="triton")
    channels_last = noise_blend(z.contiguous(memory_format=torch.channels_last), gamma, seed=3, backend="triton")
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, channels_last)


def test_backward_regenerates_exactly_the_forward_noise(small_tiles):
    z, gamma = make((3, 5, 4, 6), requires_grad=True), _gamma(3)
    noise = noise_blend(torch.zeros_like(z), torch.zeros(3), seed=SEED, backend="triton")  # γ = 0 gives ε itself
    upstream = torch.randn_like(z)
    seeded = torch.autograd.grad((noise_blend(z, gamma, seed=SEED, backend="triton") * upstream).sum(), [z, gamma])
    explicit = torch.autograd.grad((noise_blend(z, gamma, noise, backend="triton") * upstream).sum(), [z, gamma])
    assert torch.equal(seeded[0], explicit[0]) and torch.equal(seeded[1], explicit[1])


def test_advancing_a_seed_tensor_in_place_draws_new_noise():
    """What a CUDA-graph replay relies on: the kernel reads the seed's current value from memory."""
    zeros, gamma0, seed = torch.zeros(2, 3, 4, 4), torch.zeros(2), torch.tensor([5])
    before = noise_blend(zeros, gamma0, seed=seed, backend="triton")
    seed.add_(1)
    after = noise_blend(zeros, gamma0, seed=seed, backend="triton")
    assert torch.equal(after, noise_blend(zeros, gamma0, seed=6, backend="triton"))
    assert not torch.equal(before, after)


def test_changing_the_seed_between_forward_and_backward_is_caught():
    z, seed = make((2, 3, 4, 4), requires_grad=True), torch.tensor([5])
    out = noise_blend(z, torch.rand(2), seed=seed, backend="triton")
    seed.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_gamma_gradient_is_deterministic(small_tiles):
    z, gamma, upstream = make((3, 5, 4, 6)), _gamma(3), torch.randn(3, 5, 4, 6)
    grads = [torch.autograd.grad((noise_blend(z, gamma, seed=1, backend="triton") * upstream).sum(), gamma)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_fp64_gradcheck():
    """The eager Function and the registered op compute in fp64 for fp64 inputs (the public API offers
    fp32/fp16/bf16 to Triton)."""
    z = make((2, 3, 2, 3), "channels_last", torch.float64, requires_grad=True)
    gamma = torch.rand(2, dtype=torch.float64, requires_grad=True)
    noise = make((2, 3, 2, 3), dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([9])

    def eager(z, gamma, noise, seed):
        return blend_module._EagerBlend.apply(z, gamma, noise, seed, blend_module._FORWARD_PLANS(z, gamma, noise))
    for blend in (eager, torch.ops.diffkd.noise_blend):
        assert torch.autograd.gradcheck(lambda z, g: blend(z, g, None, seed), (z, gamma), fast_mode=True)
        assert torch.autograd.gradcheck(lambda z, g, n: blend(z, g, n, None), (z, gamma, noise), fast_mode=True)


def test_opcheck():
    z, gamma = make((2, 3, 2, 3), "channels_last", requires_grad=True), _gamma(2)
    noise = make((2, 3, 2, 3), requires_grad=True)
    torch.library.opcheck(torch.ops.diffkd.noise_blend.default, (z, gamma, None, torch.tensor([4])))
    torch.library.opcheck(torch.ops.diffkd.noise_blend.default, (z, gamma, noise, None))
    grad = make((2, 3, 2, 3), "channels_last")
    for noise_grad in (False, True):
        torch.library.opcheck(torch.ops.diffkd.noise_blend_backward.default,
                              (grad, z.detach(), gamma.detach(), noise.detach(), None, noise_grad),
                              test_utils="test_faketensor")


@pytest.mark.parametrize("call, message", [
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(3), seed=1, backend="triton"), r"shape \(2,\)"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2, 1), seed=1, backend="triton"), r"shape \(2,\)"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2, dtype=torch.float64), seed=1, backend="triton"),
     "one dtype"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2), backend="triton"), "either noise"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2), make((2, 3, 4, 5)), backend="triton"), "noise must"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2), seed=1.5, backend="triton"), "Python int"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2), seed=torch.tensor([1, 2]), backend="triton"),
     "one integer"),
    (lambda: noise_blend(make((2, 3, 4, 4)), torch.rand(2), seed=2 ** 64, backend="triton"), "int64"),
], ids=["gamma length", "gamma rank", "gamma dtype", "no noise source", "noise shape", "float seed",
        "seed shape", "seed range"])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()
