"""Fused DDIM step kernels (kernels/ddim.py) in Triton's interpreter against the float64 reference."""
import importlib

import pytest
import torch

from kernel_utils import LAYOUTS, LOW_PRECISION, check_against_fp64, make, poisoned_outputs, small_tiles  # noqa: F401
from kernels import ddim_step, ddim_step_embed, reference

ddim_module = importlib.import_module("kernels.ddim")  # the package's attribute ddim_step is the function

A, B = 1.4267, -0.50274  # the first NFE-5 step


def _triton_step(x, eps):
    return ddim_step(x, eps, A, B, backend="triton")


def _reference_step(x, eps):
    return reference.ddim_step(x, eps, A, B)


def _triton_step_embed(x, eps, emb):
    return ddim_step_embed(x, eps, A, B, emb, backend="triton")


def _reference_step_embed(x, eps, emb):
    return reference.ddim_step_embed(x, eps, A, B, emb)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_matches_reference_in_every_layout(layout):
    x = make((2, 6, 5, 7), layout, requires_grad=True)
    eps = make((2, 6, 5, 7), "contiguous", requires_grad=True)
    check_against_fp64(_triton_step, _reference_step, [x, eps])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_embed_matches_reference_in_every_layout(layout):
    x = make((2, 6, 5, 7), layout, requires_grad=True)
    eps = make((2, 6, 5, 7), "channels_last", requires_grad=True)
    emb = make((6,), requires_grad=True)
    check_against_fp64(_triton_step_embed, _reference_step_embed, [x, eps, emb])


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (3, 5), (2, 3, 9)], ids=["1x1", "vector", "tokens"])
def test_step_embed_on_maps_without_space(shape):
    x, eps = make(shape, requires_grad=True), make(shape, requires_grad=True)
    emb = make((shape[1],), requires_grad=True)
    check_against_fp64(_triton_step_embed, _reference_step_embed, [x, eps, emb])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_embedding_gradient_reduces_across_many_programs(small_tiles, layout):
    x = make((3, 5, 4, 6), layout, requires_grad=True)
    eps = make((3, 5, 4, 6), layout, requires_grad=True)
    emb = make((5,), requires_grad=True)
    check_against_fp64(_triton_step_embed, _reference_step_embed, [x, eps, emb])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_torch_error(dtype):
    x = make((2, 6, 5, 7), "channels_last", dtype, requires_grad=True)
    eps = make((2, 6, 5, 7), "channels_last", dtype, requires_grad=True)
    emb = make((6,), dtype=dtype, requires_grad=True)
    check_against_fp64(_triton_step_embed, _reference_step_embed, [x, eps, emb])
    check_against_fp64(_triton_step, _reference_step, [x, eps])


def test_outputs_keep_the_input_memory_format():
    x = make((2, 6, 3, 4), "channels_last")
    x_prev, next_input = ddim_step_embed(x, make((2, 6, 3, 4)), A, B, make((6,)), backend="triton")
    assert x_prev.is_contiguous(memory_format=torch.channels_last)
    assert next_input.is_contiguous(memory_format=torch.channels_last)
    assert ddim_step(make((2, 6, 3, 4), "sliced"), x, A, B, backend="triton").is_contiguous()


def test_gradient_of_one_output_alone():
    x, eps, emb = make((2, 4, 3, 3), requires_grad=True), make((2, 4, 3, 3), requires_grad=True), \
        make((4,), requires_grad=True)
    x_prev, _ = ddim_step_embed(x, eps, A, B, emb, backend="triton")
    dx, deps, demb = torch.autograd.grad(x_prev.sum(), [x, eps, emb])
    torch.testing.assert_close(dx, torch.full_like(x, A))
    torch.testing.assert_close(deps, torch.full_like(x, B))
    torch.testing.assert_close(demb, torch.zeros_like(emb))


def test_embedding_gradient_is_deterministic(small_tiles):
    x, eps, emb = make((3, 5, 4, 6), requires_grad=True), make((3, 5, 4, 6)), make((5,), requires_grad=True)
    upstream = torch.randn(3, 5, 4, 6)
    grads = [torch.autograd.grad((ddim_step_embed(x, eps, A, B, emb, backend="triton")[1] * upstream).sum(), emb)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def _eager_step(x, eps):
    return ddim_module._EagerStep.apply(x, eps, A, B, ddim_module._FORWARD_PLANS(x, eps, None))


def _eager_step_embed(x, eps, emb):
    return ddim_module._EagerStepEmbed.apply(x, eps, A, B, emb, ddim_module._FORWARD_PLANS(x, eps, emb))


def _registered_step(x, eps):
    return torch.ops.diffkd.ddim_step(x, eps, A, B)


def _registered_step_embed(x, eps, emb):
    return torch.ops.diffkd.ddim_step_embed(x, eps, A, B, emb)


@pytest.mark.parametrize("step, step_embed", [(_eager_step, _eager_step_embed),
                                              (_registered_step, _registered_step_embed)], ids=["eager", "registered"])
def test_fp64_gradcheck(step, step_embed):
    """The eager Functions and the registered ops compute in fp64 for fp64 inputs (the public API offers
    fp32/fp16/bf16 to Triton)."""
    x = make((2, 3, 2, 3), dtype=torch.float64, requires_grad=True)
    eps = make((2, 3, 2, 3), "channels_last", torch.float64, requires_grad=True)
    emb = make((3,), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(step, (x, eps), fast_mode=True)
    assert torch.autograd.gradcheck(step_embed, (x, eps, emb), fast_mode=True)


def test_opcheck():
    x, eps = make((2, 3, 2, 3), requires_grad=True), make((2, 3, 2, 3), "channels_last", requires_grad=True)
    emb = make((3,), requires_grad=True)
    torch.library.opcheck(torch.ops.diffkd.ddim_step.default, (x, eps, A, B))
    torch.library.opcheck(torch.ops.diffkd.ddim_step_embed.default, (x, eps, A, B, emb))
    grad = make((2, 3, 2, 3), "channels_last")
    torch.library.opcheck(torch.ops.diffkd.ddim_step_backward.default, (grad, A, B), test_utils="test_faketensor")
    torch.library.opcheck(torch.ops.diffkd.ddim_step_embed_backward.default, (None, grad, A, B),
                          test_utils="test_faketensor")


@pytest.mark.parametrize("call, message", [
    (lambda: ddim_step(make((2, 3, 4, 4)), make((2, 3, 4, 5)), A, B, backend="triton"), "one shape"),
    (lambda: ddim_step(make((2, 3, 4, 4)), make((2, 3, 4, 4), dtype=torch.float16), A, B, backend="triton"),
     "one dtype"),
    (lambda: ddim_step(make((2, 3, 4, 4)), make((2, 3, 4, 4)), "1.0", B, backend="triton"), "Python float"),
    (lambda: ddim_step(make((2, 3, 4, 4)), make((2, 3, 4, 4)), torch.ones(2), B, backend="triton"), "Python float"),
    (lambda: ddim_step(torch.randn(5), torch.randn(5), A, B, backend="triton"), "2, 3 or 4 dims"),
    (lambda: ddim_step_embed(make((2, 3, 4, 4)), make((2, 3, 4, 4)), A, B, make((4,)), backend="triton"),
     r"shape \(3,\)"),
    (lambda: ddim_step(make((2, 3, 4, 4)), make((2, 3, 4, 4)), A, B, backend="cuda"), "unknown backend"),
], ids=["shape", "dtype", "string coefficient", "tensor coefficient", "rank", "embedding", "backend"])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ddim_step(make((2, 3, 4, 4)), make((2, 3, 4, 4)), A, B, backend="triton")
