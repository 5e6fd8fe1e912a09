"""What every kernel relies on: layouts, output poisoning, the noise oracle, backend choice, torch.compile."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
import kernels._layout as layout
from kernel_utils import check_against_fp64, make, philox_normal, poisoned_outputs  # noqa: F401
from kernels import _common, reference

REPO = Path(__file__).resolve().parents[1]
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


@pytest.mark.parametrize("name, mergeable", [("contiguous", True), ("channels_last", True), ("sliced", True),
                                             ("spatial_slice", False), ("transposed", False)])
def test_spatial_stride_is_found_exactly_when_rows_and_columns_collapse(name, mergeable):
    assert (layout.spatial_stride(make((2, 3, 4, 5), name)) is not None) == mergeable


def test_outputs_are_poisoned_under_the_test_flag():
    assert torch.isnan(layout.new_output_like(make((2, 3, 4, 5), "channels_last"))).all()


def test_an_unwritten_tile_is_caught(monkeypatch):
    """Drop the last row block of every launch: the poisoned outputs must make the parity check fail."""
    plan_tiles = layout.plan_tiles

    def short_plan(out):
        plan = plan_tiles(out)
        return plan._replace(grid=(plan.grid[0] - 1, plan.grid[1]))
    monkeypatch.setattr(layout, "INTERPRETER_TILE_ELEMENTS", 64)
    for module in ("ddim", "blend", "qsample"):
        monkeypatch.setattr(sys.modules[f"kernels.{module}"], "plan_tiles", short_plan)
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


def test_torch_compile_fullgraph_traces_every_op():
    """Dynamo + fake tensors + AOT autograd with fullgraph=True; aot_eager keeps it cheap (no codegen)."""
    inputs = [make((2, 5, 3, 4), "channels_last", requires_grad=True), make((6, 5, 1, 1), requires_grad=True),
              make((6,), requires_grad=True), torch.rand(2, requires_grad=True), make((6,), requires_grad=True),
              torch.tensor([10, 800]), make((2, 6, 3, 4))]
    leaves = [t for t in inputs if t.requires_grad]
    eager = _chain(*inputs)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(_chain, fullgraph=True, backend="aot_eager")(*inputs)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)


class _CudaLike:
    """Stands in for a CUDA tensor in the backend rule (no GPU here)."""
    is_cuda, dtype = True, torch.float32

    def is_floating_point(self):
        return True


@pytest.mark.parametrize("capturing, expected", [(True, "triton"), (False, "torch")])
def test_auto_uses_the_kernels_for_cuda_tensors_only_inside_graph_capture(monkeypatch, capturing, expected):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(_common, "TRITON_AVAILABLE", True)
    assert kernels.resolve_backend("auto", _CudaLike()) == expected
    monkeypatch.setenv("DIFFKD_BACKEND", "torch")
    assert kernels.resolve_backend(None, _CudaLike()) == "torch"
