"""q-sampling and squared-error kernels (kernels/qsample.py) in Triton's interpreter against the float64 reference."""
import importlib

import pytest
import torch

from kernel_utils import (LAYOUTS, LOW_PRECISION, check_against_fp64, make, philox_normal,  # noqa: F401
                          poisoned_outputs, small_tiles)
from kernels import noise_blend, q_sample, reference, squared_error_mean

qsample_module = importlib.import_module("kernels.qsample")

SEED = 2 ** 33 + 7
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)


def _timesteps(batch):
    return torch.randint(0, 1000, (batch,))


def _q_sample_pair(t, seed=None, shape=None):
    """Triton q_sample (in-kernel noise when ``seed`` is given) and the reference fed the same noise."""
    oracle = philox_normal(seed, shape) if seed is not None else None

    def triton_q(z0, *noise):
        return q_sample(z0, t, ALPHAS_CUMPROD, *noise, seed=seed, backend="triton")

    def reference_q(z0, *noise):
        return reference.q_sample(z0, t, ALPHAS_CUMPROD, *(noise or (oracle.to(z0.dtype),)))
    return triton_q, reference_q


def _squared_error_pair(seed=None, shape=None):
    oracle = philox_normal(seed, shape) if seed is not None else None

    def triton_se(pred, *target):
        return squared_error_mean(pred, *target, seed=seed, backend="triton")

    def reference_se(pred, *target):
        return reference.squared_error_mean(pred, *(target or (oracle.to(pred.dtype),)))
    return triton_se, reference_se


@pytest.mark.parametrize("layout", LAYOUTS)
def test_q_sample_matches_reference(layout):
    z0 = make((3, 6, 5, 7), layout, requires_grad=True)
    check_against_fp64(*_q_sample_pair(_timesteps(3), SEED, z0.shape), [z0])
    check_against_fp64(*_q_sample_pair(_timesteps(3)), [z0, make(z0.shape, "channels_last", requires_grad=True)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_squared_error_mean_matches_reference(layout):
    pred = make((3, 6, 5, 7), layout, requires_grad=True)
    check_against_fp64(*_squared_error_pair(SEED, pred.shape), [pred])
    check_against_fp64(*_squared_error_pair(), [pred, make(pred.shape, "transposed", requires_grad=True)])


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (3, 5), (2, 3, 9)], ids=["1x1", "vector", "tokens"])
def test_maps_without_space(shape):
    z0 = make(shape, requires_grad=True)
    check_against_fp64(*_q_sample_pair(_timesteps(shape[0]), 5, shape), [z0])
    check_against_fp64(*_squared_error_pair(5, shape), [z0])


def test_reductions_across_many_programs(small_tiles):
    pred = make((3, 5, 4, 6), "channels_last", requires_grad=True)
    check_against_fp64(*_squared_error_pair(SEED, pred.shape), [pred])
    check_against_fp64(*_squared_error_pair(), [pred, make(pred.shape, requires_grad=True)])
    check_against_fp64(*_q_sample_pair(_timesteps(3), SEED, pred.shape), [pred])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_torch_error(dtype):
    z0 = make((2, 6, 5, 7), "channels_last", dtype, requires_grad=True)
    check_against_fp64(*_q_sample_pair(_timesteps(2), SEED, z0.shape), [z0])
    check_against_fp64(*_squared_error_pair(SEED, z0.shape), [z0])
    check_against_fp64(*_squared_error_pair(), [z0, make(z0.shape, dtype=dtype, requires_grad=True)])


def test_loss_is_fp32_for_mixed_and_low_precision_inputs():
    pred = make((2, 3, 4, 4), dtype=torch.bfloat16, requires_grad=True)
    target = make((2, 3, 4, 4))
    loss = squared_error_mean(pred, target, backend="triton")
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, (pred.float() - target).pow(2).mean())
    assert torch.autograd.grad(loss, pred)[0].dtype == torch.bfloat16


def test_diffusion_loss_regenerates_the_q_sample_noise():
    """mean((Φ(z_t) − ε)²) with ε regenerated from the seed equals the loss against the materialised ε."""
    z0 = make((2, 4, 3, 5))
    t = _timesteps(2)
    noise = noise_blend(torch.zeros_like(z0), torch.zeros(2), seed=SEED, backend="triton")  # γ = 0: ε itself
    torch.testing.assert_close(q_sample(z0, t, ALPHAS_CUMPROD, seed=SEED, backend="triton"),
                               q_sample(z0, t, ALPHAS_CUMPROD, noise, backend="triton"), rtol=0, atol=0)
    pred = make(z0.shape, requires_grad=True)
    seeded = squared_error_mean(pred, seed=SEED, backend="triton")
    explicit = squared_error_mean(pred, noise, backend="triton")
    assert torch.equal(seeded, explicit)
    assert torch.equal(torch.autograd.grad(seeded, pred)[0], torch.autograd.grad(explicit, pred)[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")  # the interpreter's numpy making the NaN
def test_timestep_outside_the_table_gives_nan_for_its_sample_only():
    z0 = make((3, 2, 2, 2))
    out = q_sample(z0, torch.tensor([0, 1000, -1]), ALPHAS_CUMPROD, seed=1, backend="triton")
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


def _eager_q_sample(z0, t, table, noise, seed):
    return qsample_module._EagerQSample.apply(z0, t, table, noise, seed,
                                              qsample_module._Q_SAMPLE_PLANS(z0, t, table, noise))


def _eager_squared_error(pred, target, seed):
    return qsample_module._EagerSquaredError.apply(pred, target, seed,
                                                   qsample_module._SQUARED_ERROR_PLANS(pred, target))


@pytest.mark.parametrize("path", ["eager", "registered"])
def test_fp64_gradcheck(path):
    """The eager Functions and the registered ops compute in fp64 for fp64 inputs (the public API offers
    fp32/fp16/bf16 to Triton)."""
    q, se = (_eager_q_sample, _eager_squared_error) if path == "eager" else \
        (torch.ops.diffkd.q_sample, torch.ops.diffkd.squared_error_mean)
    z0 = make((2, 3, 2, 3), "channels_last", torch.float64, requires_grad=True)
    noise = make((2, 3, 2, 3), dtype=torch.float64, requires_grad=True)
    t, seed = torch.tensor([10, 900]), torch.tensor([3])
    assert torch.autograd.gradcheck(lambda z, n: q(z, t, ALPHAS_CUMPROD, n, None), (z0, noise), fast_mode=True)
    assert torch.autograd.gradcheck(lambda z: q(z, t, ALPHAS_CUMPROD, None, seed), (z0,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda p, q: se(p, q, None), (z0, noise), fast_mode=True)
    assert torch.autograd.gradcheck(lambda p: se(p, None, seed), (z0,), fast_mode=True)


def test_opcheck():
    z0, noise = make((2, 3, 2, 3), "channels_last", requires_grad=True), make((2, 3, 2, 3), requires_grad=True)
    t, seed = torch.tensor([10, 900]), torch.tensor([3])
    torch.library.opcheck(torch.ops.diffkd.q_sample.default, (z0, t, ALPHAS_CUMPROD, None, seed))
    torch.library.opcheck(torch.ops.diffkd.q_sample.default, (z0, t, ALPHAS_CUMPROD, noise, None))
    torch.library.opcheck(torch.ops.diffkd.squared_error_mean.default, (z0, noise, None))
    torch.library.opcheck(torch.ops.diffkd.squared_error_mean.default, (z0, None, seed))
    grad = make((2, 3, 2, 3), "channels_last")
    torch.library.opcheck(torch.ops.diffkd.q_sample_backward.default, (grad, t, ALPHAS_CUMPROD, True),
                          test_utils="test_faketensor")
    torch.library.opcheck(torch.ops.diffkd.squared_error_mean_backward.default,
                          (torch.tensor(1.0), z0.detach(), noise.detach(), None, True), test_utils="test_faketensor")


@pytest.mark.parametrize("call, message", [
    (lambda: q_sample(make((2, 3, 4, 4)), torch.tensor([1, 2, 3]), ALPHAS_CUMPROD, seed=1, backend="triton"),
     "one integer timestep"),
    (lambda: q_sample(make((2, 3, 4, 4)), torch.tensor([1.0, 2.0]), ALPHAS_CUMPROD, seed=1, backend="triton"),
     "one integer timestep"),
    (lambda: q_sample(make((2, 3, 4, 4)), torch.tensor([1, 2]), ALPHAS_CUMPROD.half(), seed=1, backend="triton"),
     "never half"),
    (lambda: q_sample(make((2, 3, 4, 4)), torch.tensor([1, 2]), ALPHAS_CUMPROD.clone().requires_grad_(), seed=1,
                      backend="triton"), "constant schedule"),
    (lambda: q_sample(make((2, 3, 4, 4)), torch.tensor([1, 2]), ALPHAS_CUMPROD, backend="triton"), "either noise"),
    (lambda: q_sample(make((2, 3, 4, 4)), torch.tensor([1, 2]), ALPHAS_CUMPROD, make((2, 3, 4, 4), dtype=torch.half),
                      backend="triton"), "one dtype"),
    (lambda: squared_error_mean(make((2, 3, 4, 4)), make((2, 3, 4, 5)), backend="triton"), "one shape"),
    (lambda: squared_error_mean(make((2, 3, 4, 4)), backend="triton"), "either noise"),
], ids=["t length", "t dtype", "half table", "table grad", "no noise source", "noise dtype", "target shape",
        "no target"])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()
