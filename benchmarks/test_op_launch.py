"""Host-side cost of every op in ``kernels``, per backend, forward and forward+backward (pytest-benchmark; not
part of ``pytest tests/``).

    TRITON_INTERPRET=1 pytest benchmarks/test_op_launch.py    # CPU: also the interpreter against the reference
    pytest benchmarks/test_op_launch.py --benchmark-group-by=param:op,param:direction       # on a GPU

The tensors are tiny, so the time is what the host spends per call: argument checks, backend resolution, the
autograd node, and on a GPU the kernel launches themselves (launches are asynchronous and the tiny kernels finish
faster than they are issued, so the queue never fills and no synchronisation is timed).  The Triton backend is
timed on its eager path — the public function straight to the op's autograd Function and launchers, never the
torch.library op (checked on the output's autograd node before timing); on a GPU each op's forward call must
take at most ``HOST_TARGET_US`` (20 µs) of host time (median), asserted.  Each op's outputs (and gradients) are
first checked against the reference, so a broken op fails instead of being timed; on a CPU the Triton backend is
only checked (in Triton's interpreter, against the reference): there a "launch" runs the whole kernel in Python.  Whole heads, eager Triton
against eager torch: ``python benchmarks/bench_head.py --shapes cifar-feature,cifar-logit
--providers ours-torch,ours-triton --no-profile``.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from kernels._common import interpreter_enabled, triton_importable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = triton_importable() and (DEVICE == "cuda" or interpreter_enabled())
HOST_TARGET_US = 20.0  # per eager forward call of a Triton op on a GPU host
B, C, S = 2, 8, 4
COEFFICIENTS = (1.4267, -0.50274)
# The autograd node of each op's eager Triton path (kernels._common.eager_autograd names them).
EAGER_NODES = {"ddim_step": "DDIMStepBackward", "ddim_step_embed": "DDIMStepEmbedBackward",
               "noise_blend": "NoiseBlendBackward", "conv1x1": "Conv1x1Backward", "q_sample": "QSampleBackward",
               "squared_error_mean": "SquaredErrorMeanBackward"}


def _inputs(requires_grad: bool):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_(requires_grad)
    x, eps, noise = randn(B, C, S, S), randn(B, C, S, S), randn(B, C, S, S)
    return {
        "x": x, "eps": eps, "noise": noise, "emb": randn(C),
        "gamma": torch.rand(B, generator=generator).to(DEVICE).requires_grad_(requires_grad),
        "weight": randn(2 * C, C, 1, 1), "bias": randn(2 * C),
        "t": torch.randint(0, 1000, (B,), generator=generator).to(DEVICE),
        "alphas_cumprod": torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(DEVICE),
    }


# op name: (call with a backend, call of the reference, names of the differentiable inputs)
OPS = {
    "ddim_step": (lambda a, backend: kernels.ddim_step(a["x"], a["eps"], *COEFFICIENTS, backend=backend),
                  lambda a: reference.ddim_step(a["x"], a["eps"], *COEFFICIENTS), ("x", "eps")),
    "ddim_step_embed": (lambda a, backend: kernels.ddim_step_embed(a["x"], a["eps"], *COEFFICIENTS, a["emb"],
                                                                   backend=backend),
                        lambda a: reference.ddim_step_embed(a["x"], a["eps"], *COEFFICIENTS, a["emb"]),
                        ("x", "eps", "emb")),
    "noise_blend": (lambda a, backend: kernels.noise_blend(a["x"], a["gamma"], a["noise"], backend=backend),
                    lambda a: reference.noise_blend(a["x"], a["gamma"], a["noise"]), ("x", "gamma", "noise")),
    "conv1x1": (lambda a, backend: kernels.conv1x1(a["x"], a["weight"], a["bias"], backend=backend),
                lambda a: reference.conv1x1(a["x"], a["weight"], a["bias"]), ("x", "weight", "bias")),
    "q_sample": (lambda a, backend: kernels.q_sample(a["x"], a["t"], a["alphas_cumprod"], a["noise"],
                                                     backend=backend),
                 lambda a: reference.q_sample(a["x"], a["t"], a["alphas_cumprod"], a["noise"]), ("x", "noise")),
    "squared_error_mean": (lambda a, backend: kernels.squared_error_mean(a["x"], a["eps"], backend=backend),
                           lambda a: reference.squared_error_mean(a["x"], a["eps"]), ("x", "eps")),
}


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _assert_close(actual, expected) -> None:
    for got, want in zip(actual, expected, strict=True):
        # TF32 GEMMs on a GPU: a loose bound that still catches a wrong kernel.
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _forward_and_backward(call, leaves, cotangents):
    """One forward call and the gradients of Σ cotangent·output w.r.t. the leaves."""
    def step(args, backend):
        return torch.autograd.grad(_as_tuple(call(args, backend)), leaves, cotangents)
    return step


def _checked(op: str, backend: str, direction: str):
    """The call to time (forward, or forward + gradients), after checking it against the reference."""
    call, ref, differentiable = OPS[op]
    args = _inputs(requires_grad=direction != "forward")
    outputs = _as_tuple(call(args, backend))
    _assert_close(outputs, _as_tuple(ref(args)))
    if direction == "forward":
        return call, args
    leaves = [args[name] for name in differentiable]
    cotangents = [torch.randn_like(out) for out in outputs]
    timed = _forward_and_backward(call, leaves, cotangents)
    _assert_close(timed(args, backend), torch.autograd.grad(_as_tuple(ref(args)), leaves, cotangents))
    if backend == "triton":
        assert type(outputs[0].grad_fn).__name__ == EAGER_NODES[op], "not the eager Triton path"
    return timed, args


@pytest.mark.skipif(not TRITON_RUNS, reason="needs a CUDA GPU or Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("op", list(OPS))
def test_triton_matches_the_reference(op, direction):
    _checked(op, "triton", direction)


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="the Triton backend's launch cost needs a CUDA GPU"))])
@pytest.mark.parametrize("op", list(OPS))
def test_launch_cost(benchmark, op, backend, direction):
    timed, args = _checked(op, backend, direction)
    benchmark.group = f"{op} {direction}"
    benchmark.extra_info.update(device=DEVICE, backend=backend, direction=direction)
    benchmark(timed, args, backend)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    if backend == "triton" and direction == "forward" and benchmark.enabled:  # not under --benchmark-disable
        host_us = benchmark.stats.stats.median * 1e6
        assert host_us <= HOST_TARGET_US, f"{op}: {host_us:.1f} µs of host time per call > {HOST_TARGET_US:g} µs"
