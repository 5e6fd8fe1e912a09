"""Host-side launch cost of every op in ``kernels``, per backend (pytest-benchmark; not part of ``pytest tests/``).

    pytest benchmarks/test_op_launch.py                       # torch backend on a CPU; both backends on a GPU
    pytest benchmarks/test_op_launch.py --benchmark-group-by=param:op

The tensors are tiny, so the time is what the host spends per call: argument checks, backend resolution,
dispatch, and on a GPU the kernel launch itself (launches are asynchronous and the tiny kernels finish faster
than they are issued, so the queue never fills and no synchronisation is timed).  Each op's output is first
checked against the reference, so a broken op fails instead of being timed.  The Triton backend is measured on
a GPU only: in Triton's CPU interpreter a "launch" runs the whole kernel in Python.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="the Triton backend's launch cost needs a CUDA GPU"))]
B, C, S = 2, 8, 4


def _inputs():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)
    x, eps, noise = randn(B, C, S, S), randn(B, C, S, S), randn(B, C, S, S)
    return {
        "x": x, "eps": eps, "noise": noise, "emb": randn(C), "gamma": torch.rand(B, generator=generator).to(DEVICE),
        "weight": randn(2 * C, C, 1, 1), "bias": randn(2 * C),
        "t": torch.randint(0, 1000, (B,), generator=generator).to(DEVICE),
        "alphas_cumprod": torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(DEVICE),
    }


# op name: (call with a backend, call of the reference)
OPS = {
    "ddim_step": (lambda a, backend: kernels.ddim_step(a["x"], a["eps"], 1.4267, -0.50274, backend=backend),
                  lambda a: reference.ddim_step(a["x"], a["eps"], 1.4267, -0.50274)),
    "ddim_step_embed": (lambda a, backend: kernels.ddim_step_embed(a["x"], a["eps"], 1.4267, -0.50274, a["emb"],
                                                                   backend=backend),
                        lambda a: reference.ddim_step_embed(a["x"], a["eps"], 1.4267, -0.50274, a["emb"])),
    "noise_blend": (lambda a, backend: kernels.noise_blend(a["x"], a["gamma"], a["noise"], backend=backend),
                    lambda a: reference.noise_blend(a["x"], a["gamma"], a["noise"])),
    "conv1x1": (lambda a, backend: kernels.conv1x1(a["x"], a["weight"], a["bias"], backend=backend),
                lambda a: reference.conv1x1(a["x"], a["weight"], a["bias"])),
    "q_sample": (lambda a, backend: kernels.q_sample(a["x"], a["t"], a["alphas_cumprod"], a["noise"],
                                                     backend=backend),
                 lambda a: reference.q_sample(a["x"], a["t"], a["alphas_cumprod"], a["noise"])),
    "squared_error_mean": (lambda a, backend: kernels.squared_error_mean(a["x"], a["eps"], backend=backend),
                           lambda a: reference.squared_error_mean(a["x"], a["eps"])),
}


def _assert_close(actual, expected) -> None:
    if isinstance(expected, tuple):
        for a, e in zip(actual, expected, strict=True):
            _assert_close(a, e)
        return
    # TF32 GEMMs on a GPU: a loose bound that still catches a wrong kernel.
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_launch_cost(benchmark, op, backend):
    args = _inputs()
    call, ref = OPS[op]
    _assert_close(call(args, backend), ref(args))
    benchmark.group = op
    benchmark.extra_info.update(device=DEVICE, backend=backend)
    benchmark(call, args, backend)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
