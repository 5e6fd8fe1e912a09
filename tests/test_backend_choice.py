"""The one backend resolver (kernels._common.choose_backend) and what asks it: the head's choice between in-kernel
and tensor noise, and the paths diffkd.graphs.head_path predicts.

On a CPU "auto" never picks Triton (no compiled kernels); ``auto_on_any_device`` lets it pick Triton's interpreter
for CPU tensors, so that a graph's mix of Triton and torch ops (its table AUTO_TRITON_IN_GRAPHS) runs here.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import kernels
from diffkd import DiffKDHead
from kernels import _common, reference
from kernels.testing import philox_normal

TABLE = tuple(_common.AUTO_TRITON_IN_GRAPHS)
CUDA_FP32 = _common.device_traits("cuda", torch.float32)


@pytest.fixture
def auto_on_any_device(monkeypatch):
    """"auto" resolves for CPU tensors as for CUDA ones (the Triton ops then run in the interpreter)."""
    if not (_common.triton_importable() and _common.interpreter_enabled()):
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest on CPU-only machines)")
    monkeypatch.setattr(_common, "_auto_can_run", lambda traits: traits.triton_dtypes and traits.fits_int32)


def test_the_resolver_predicts_inside_and_outside_graphs(monkeypatch):
    if not _common.triton_importable():
        pytest.skip("triton does not import")
    assert set(_common.op_backends("auto", CUDA_FP32, in_graph=False).values()) == {"torch"}
    assert set(_common.op_backends("auto", CUDA_FP32, in_graph=True).values()) == {"triton"}
    assert set(_common.op_backends("auto", _common.device_traits("cuda", torch.float64), in_graph=True).values()) \
        == {"torch"}
    assert set(_common.op_backends("torch", CUDA_FP32, in_graph=True).values()) == {"torch"}
    monkeypatch.setitem(_common.AUTO_TRITON_IN_GRAPHS, "conv1x1", False)
    assert _common.op_backends("auto", CUDA_FP32, in_graph=True)["conv1x1"] == "torch"
    with kernels.auto_uses_triton():  # "here" is graph-like: the table decides
        assert _common.choose_backend("auto", "q_sample", CUDA_FP32) == "triton"
        assert _common.choose_backend("auto", "conv1x1", CUDA_FP32) == "torch"
        assert _common.choose_backend("auto", "q_sample", CUDA_FP32, in_graph=False) == "torch"


# The positional arguments after the first of each noise-reading op, as DiffKDHead.forward passes them.
NOISE_OPS = {"noise_blend": ("gamma", "noise", "seed"), "q_sample": ("t", "alphas_cumprod", "noise", "seed"),
             "squared_error_mean": ("noise", "seed")}


def _spy(monkeypatch, calls: list):
    """Records every call of the noise-reading ops, in order, as (op, first tensor, named arguments, backend)."""
    for op, names in NOISE_OPS.items():
        def spy(*args, _op=op, _names=names, _real=getattr(kernels, op), **kwargs):
            calls.append((_op, args[0], dict(zip(_names, args[1:])), kwargs.get("backend")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernels, op, spy)


def _noise_used(call) -> torch.Tensor:
    """The noise an op read, called inside ``auto_uses_triton()``: the tensor given, or the one it drew from the
    seed on the backend it ran."""
    op, like, named, backend = call
    if named.get("noise") is not None:
        return named["noise"].detach()
    if _common.resolve_backend(backend, like, op=op, in_graph=True) == "triton":
        return philox_normal(int(named["seed"]), like.shape).to(like.dtype)
    return reference.seeded_normal(like, named["seed"])


def test_every_mix_of_triton_and_torch_ops_draws_consistent_noise(auto_on_any_device, monkeypatch):
    """For every subset of the table running Triton, the head's losses are the reference's for the noise it drew;
    in particular q_sample and the diffusion loss read one noise."""
    reference_head = DiffKDHead(4, 8, kernel_size=1, use_ae=True, ae_channels=8, inference_steps=2, backend="torch")
    head = DiffKDHead(4, 8, kernel_size=1, use_ae=True, ae_channels=8, inference_steps=2, backend="auto")
    head.load_state_dict(reference_head.state_dict())
    student, teacher = torch.randn(2, 4), torch.randn(2, 8)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    for chosen in itertools.product((False, True), repeat=len(TABLE)):
        for op, uses_triton in zip(TABLE, chosen):
            monkeypatch.setitem(_common.AUTO_TRITON_IN_GRAPHS, op, uses_triton)
        calls: list = []
        with monkeypatch.context() as patch:
            _spy(patch, calls)
            with torch.no_grad(), kernels.auto_uses_triton():
                got = head(student, teacher)
        [blend] = [c for c in calls if c[0] == "noise_blend"]
        [q_sample] = [c for c in calls if c[0] == "q_sample"]
        diffusion_loss = calls[calls.index(q_sample) + 1]  # the diffusion loss comes right after q_sample
        assert diffusion_loss[0] == "squared_error_mean"
        assert torch.equal(_noise_used(q_sample), _noise_used(diffusion_loss)), chosen
        with torch.no_grad():
            expected = reference_head(student, teacher, blend_noise=_noise_used(blend),
                                      diffusion_noise=_noise_used(q_sample), diffusion_t=q_sample[2]["t"])
        for key in ("loss", "kd_loss", "diffusion_loss", "ae_loss"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{key} for {chosen}")
        head.load_state_dict(state)
        reference_head.load_state_dict(state)
