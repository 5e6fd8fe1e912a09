"""What every kernel relies on: layouts, output poisoning, the noise oracle, backend choice, the eager path
without the dispatcher, torch.compile."""
import importlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels._layout as layout
from kernel_utils import check_against_fp64, make, philox_normal, poisoned_outputs, small_tiles  # noqa: F401
from kernels import _common, reference

REPO = Path(__file__).resolve().parents[1]
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


@pytest.mark.parametrize("name, mergeable", [("contiguous", True), ("channels_last", True), ("sliced", True),
                                             ("spatial_slice", False), ("transposed", False)])
def test_spatial_stride_is_found_exactly_when_rows_and_columns_collapse(name, mergeable):
    assert (layout.spatial_stride(make((2, 3, 4, 5), name)) is not None) == mergeable


def test_outputs_are_poisoned_under_the_test_flag():
    assert torch.isnan(layout.new_output_like(make((2, 3, 4, 5), "channels_last"))).all()


def test_an_unwritten_tile_is_caught(monkeypatch, small_tiles):
    """Drop the last row block of every launch: the poisoned outputs must make the parity check fail."""
    plan_tiles = layout.plan_tiles

    def short_plan(out):
        plan = plan_tiles(out)
        return plan._replace(grid=(plan.grid[0] - 1, plan.grid[1]))
    monkeypatch.setattr(layout, "plan_tiles", short_plan)
    x = make((2, 3, 4, 5), requires_grad=True)
    with pytest.raises(AssertionError):
        check_against_fp64(lambda x: kernels.ddim_step(x, x, 1.0, 2.0, backend="triton"),
                           lambda x: reference.ddim_step(x, x, 1.0, 2.0), [x])


def test_philox_oracle_matches_the_kernels_noise():
    for seed in (0, 123, 2 ** 40 + 5, -3):
        noise = kernels.noise_blend(torch.zeros(2, 3, 5, 7), torch.zeros(2), seed=seed, backend="triton")
        torch.testing.assert_close(noise.double(), philox_normal(seed, (2, 3, 5, 7)), rtol=0, atol=2e-6)


def test_auto_never_picks_the_interpreter():
    z, gamma = make((2, 3, 4, 4)), torch.rand(2)
    assert kernels.resolve_backend(None, z) == "torch"
    # The torch backend draws its noise from torch.Generator: this is the reference's noise, not Philox's.
    torch.testing.assert_close(kernels.noise_blend(z, gamma, seed=5), reference.noise_blend(z, gamma, seed=5))


def test_kernels_import_without_triton():
    """On CPU-only PyTorch (no Triton) the package imports, the torch backend works and triton is refused."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "assert torch.equal(kernels.ddim_step(x, x, 1.0, 2.0), 3.0 * x)\n"
        "try:\n"
        "    kernels.ddim_step(x, x, 1.0, 2.0, backend='triton')\n"
        "except ValueError as error:\n"
        "    assert 'does not import' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('triton backend was not refused')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _chain(x, weight, bias, gamma, emb, t, target):
    """Every op once, as the DiffKD head strings them (in-kernel noise included)."""
    z = kernels.conv1x1(x, weight, bias, backend="triton")
    x_t = kernels.noise_blend(z, gamma, seed=3, backend="triton")
    x_prev, next_input = kernels.ddim_step_embed(x_t, 0.5 * z, 1.2, -0.4, emb, backend="triton")
    x_0 = kernels.ddim_step(x_prev, next_input, 1.05, -0.3, backend="triton")
    noisy = kernels.q_sample(target, t, ALPHAS_CUMPROD, seed=4, backend="triton")
    return kernels.squared_error_mean(x_0, target, backend="triton") + \
        kernels.squared_error_mean(noisy * 0.5, seed=4, backend="triton")


def _chain_inputs():
    inputs = [make((2, 5, 3, 4), "channels_last", requires_grad=True), make((6, 5, 1, 1), requires_grad=True),
              make((6,), requires_grad=True), torch.rand(2, requires_grad=True), make((6,), requires_grad=True),
              torch.tensor([10, 800]), make((2, 6, 3, 4))]
    return inputs, [t for t in inputs if t.requires_grad]


# The registered (torch.library) operators of every op, forward and backward, by module.
REGISTERED_OPS = {"ddim": ("_ddim_step_op", "_ddim_step_embed_op", "_ddim_step_backward_op",
                           "_ddim_step_embed_backward_op"),
                  "blend": ("_noise_blend_op", "_noise_blend_backward_op"),
                  "conv1x1": ("_conv1x1_op", "_conv1x1_weight_grad_op"),
                  "qsample": ("_q_sample_op", "_q_sample_backward_op", "_squared_error_mean_op",
                              "_squared_error_mean_backward_op")}


def test_torch_compile_fullgraph_traces_every_op():
    """Dynamo + fake tensors + AOT autograd with fullgraph=True; aot_eager keeps it cheap (no codegen).  The
    traced graph holds the registered ops (not the eager path), and values and gradients match eager."""
    inputs, leaves = _chain_inputs()
    eager = _chain(*inputs)
    eager_grads = torch.autograd.grad(eager, leaves)
    traced = set()

    def recording_aot_eager(graph_module, example_inputs):
        traced.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(_chain, fullgraph=True, backend=recording_aot_eager)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    assert {f"diffkd.{op}.default" for op in _common.AUTO_TRITON_IN_GRAPHS} <= traced
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)


class _DispatchedNamespaces(TorchDispatchMode):
    """Records the namespace of every operator that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def test_eager_triton_calls_bypass_the_registered_ops(monkeypatch):
    """Forward and backward of every op on the eager Triton path: no diffkd operator reaches the dispatcher, and
    the registered ops, replaced by ones that raise, are never called."""
    def refuse(*args, **kwargs):
        raise AssertionError("a registered diffkd op was called on the eager path")
    for module, names in REGISTERED_OPS.items():
        for name in names:
            monkeypatch.setattr(importlib.import_module(f"kernels.{module}"), name, refuse)
    inputs, leaves = _chain_inputs()
    with _DispatchedNamespaces() as dispatched:
        loss = _chain(*inputs)
        grads = torch.autograd.grad(loss, leaves)
    assert "diffkd" not in dispatched.namespaces and "aten" in dispatched.namespaces
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # The same recorder does see a registered op when one is called.
    with _DispatchedNamespaces() as dispatched:
        torch.ops.diffkd.ddim_step(inputs[0].detach(), inputs[0].detach(), 1.0, 2.0)
    assert "diffkd" in dispatched.namespaces


def test_plans_are_made_once_per_signature_and_per_call_arguments_still_checked(monkeypatch):
    ddim = importlib.import_module("kernels.ddim")
    plans_made = []

    def counted_plan(*args):
        plans_made.append(args)
        return forward_plan(*args)
    forward_plan = ddim._forward_plan
    monkeypatch.setattr(ddim, "_forward_plan", counted_plan)
    _common.clear_signature_caches()
    x, eps = make((2, 3, 4, 5), "channels_last"), make((2, 3, 4, 5))
    for _ in range(2):
        torch.testing.assert_close(kernels.ddim_step(x, eps, 1.5, -0.5, backend="triton"), 1.5 * x - 0.5 * eps)
    assert len(plans_made) == 1
    # Same shapes, other strides: another signature, another plan.
    sliced = make((2, 3, 4, 5), "spatial_slice")
    torch.testing.assert_close(kernels.ddim_step(sliced, eps, 1.5, -0.5, backend="triton"), 1.5 * sliced - 0.5 * eps)
    assert len(plans_made) == 2
    # What a signature does not fix is checked on every call.
    with pytest.raises(ValueError, match="Python float"):
        kernels.ddim_step(x, eps, "1.5", -0.5, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        kernels.ddim_step(x, eps.half(), 1.5, -0.5, backend="triton")
    gamma = torch.rand(2)
    kernels.noise_blend(x, gamma, seed=1, backend="triton")
    with pytest.raises(ValueError, match="Python int"):
        kernels.noise_blend(x, gamma, seed=1.5, backend="triton")
    kernels.q_sample(x, torch.tensor([1, 2]), ALPHAS_CUMPROD, seed=1, backend="triton")
    with pytest.raises(ValueError, match="constant schedule"):
        kernels.q_sample(x, torch.tensor([1, 2]), ALPHAS_CUMPROD.clone().requires_grad_(), seed=1, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # after successful calls of this signature in the interpreter
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.ddim_step(x, eps, 1.5, -0.5, backend="triton")


# ---- backend resolution -----------------------------------------------------------------------------------------
CUDA_TRAITS = _common.BackendTraits(on_cuda=True, triton_dtypes=True, fits_int32=True, largest=16,
                                    devices=(torch.device("cuda", 0),), dtypes=(torch.float32,))


@pytest.fixture
def triton_on_a_gpu(monkeypatch):
    """Triton imports and no CUDA graph is being captured (the rule is checked with CUDA_TRAITS: no GPU here)."""
    monkeypatch.setattr(_common, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_every_op_has_an_entry_in_the_auto_table():
    ops = {"ddim_step", "ddim_step_embed", "noise_blend", "conv1x1", "q_sample", "squared_error_mean"}
    assert set(_common.AUTO_TRITON_IN_GRAPHS) == ops and ops <= set(kernels.__all__)


@pytest.mark.parametrize("capturing", [True, False])
@pytest.mark.parametrize("op", list(_common.AUTO_TRITON_IN_GRAPHS))
def test_auto_follows_the_table_for_cuda_tensors_inside_graph_capture(monkeypatch, triton_on_a_gpu, capturing, op):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    for uses_triton in (True, False):
        monkeypatch.setitem(_common.AUTO_TRITON_IN_GRAPHS, op, uses_triton)
        expected = "triton" if capturing and uses_triton else "torch"
        assert _common.choose_backend("auto", op, CUDA_TRAITS) == expected
        assert _common.choose_backend("triton", op, CUDA_TRAITS) == "triton"
    monkeypatch.setenv("DIFFKD_BACKEND", "torch")
    assert _common.choose_backend(None, op, CUDA_TRAITS) == "torch"


def test_auto_keeps_pytorch_when_the_kernels_cannot_run(monkeypatch, triton_on_a_gpu):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for unfit in (dict(triton_dtypes=False), dict(fits_int32=False, largest=2 ** 31)):
        assert _common.choose_backend("auto", "ddim_step", CUDA_TRAITS._replace(**unfit)) == "torch"
    with pytest.raises(ValueError, match="too large for the Triton backend"):
        _common.choose_backend("triton", "ddim_step", CUDA_TRAITS._replace(fits_int32=False, largest=2 ** 31))
    monkeypatch.setattr(_common, "TRITON_AVAILABLE", False)
    assert _common.choose_backend("auto", "ddim_step", CUDA_TRAITS) == "torch"


def test_auto_uses_triton_resolves_as_graph_capture_does(triton_on_a_gpu):
    def auto():
        return _common.choose_backend("auto", "noise_blend", CUDA_TRAITS)
    assert auto() == "torch"
    with kernels.auto_uses_triton():
        assert auto() == "triton"
        with kernels.auto_uses_triton():
            assert auto() == "triton"
        assert auto() == "triton"
        assert _common.choose_backend("torch", "noise_blend", CUDA_TRAITS) == "torch"  # explicit still wins
        other_thread = []
        worker = threading.Thread(target=lambda: other_thread.append(auto()))
        worker.start()
        worker.join()
        assert other_thread == ["torch"]  # thread-local, like torch.no_grad
        # CPU tensors stay on PyTorch, and so draw the reference's noise.
        z, gamma = make((2, 3, 4, 4)), torch.rand(2)
        assert kernels.resolve_backend("auto", z, op="noise_blend") == "torch"
        torch.testing.assert_close(kernels.noise_blend(z, gamma, seed=5), reference.noise_blend(z, gamma, seed=5))
    assert auto() == "torch"
    with pytest.raises(RuntimeError), kernels.auto_uses_triton():
        raise RuntimeError("leaving the block by an exception")
    assert auto() == "torch"
