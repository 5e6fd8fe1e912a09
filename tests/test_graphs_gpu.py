"""CUDAGraphHead on a real GPU with the compiled Triton kernels (marked ``gpu``; skipped without CUDA).

Each test trains a graphed head and an eager twin with the same weights, kernels (backend "triton") and random
state per micro-batch (the seeds come from the device's default generator, restored before the twin's call), and
checks after every optimizer step the accumulated ``.grad`` of every parameter (as one vector) and every buffer
(BatchNorm statistics; ``num_batches_tracked`` exactly).  Run: ``pytest tests/test_graphs_gpu.py`` (or ``-m gpu``).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from diffkd import CUDAGraphHead, DiffKDHead
from diffkd.graphs import buffer_error, gradient_error
from diffkd.graphs.head import LOW_PRECISION_TOLERANCE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOLERANCE = 1e-3  # Triton's atomics and TF32 reorder sums; the eager twin runs the same kernels


def _features(batch: int, seed: int, channels_last: bool = False):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, 32, 8, 8, generator=generator).cuda()
    teacher = torch.randn(batch, 64, 8, 8, generator=generator).cuda()
    if channels_last:
        student, teacher = (t.contiguous(memory_format=torch.channels_last) for t in (student, teacher))
    return student.requires_grad_(), teacher


def _train(steps: int = 10, micro_batches: int = 2, batch_of=lambda step: 8, channels_last: bool = False,
           autocast: torch.dtype | None = None, wrap=lambda m: m, no_sync=None, tolerance: float = TOLERANCE):
    """Trains CUDAGraphHead(head) (wrapped by ``wrap``) against an eager twin; returns the graphed wrapper."""
    head = DiffKDHead(32, 64, use_ae=True, ae_channels=32, backend="triton").cuda()
    twin = copy.deepcopy(head)
    graphed = CUDAGraphHead(head)
    model = wrap(graphed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    amp = (lambda: torch.autocast("cuda", dtype=autocast)) if autocast else contextlib.nullcontext
    for step in range(steps):
        for index in range(micro_batches):
            student, teacher = _features(batch_of(step), 100 * step + index, channels_last)
            twin_student = student.detach().clone().requires_grad_()
            state = torch.cuda.get_rng_state()
            last = index + 1 == micro_batches
            with amp(), (no_sync() if no_sync and not last else contextlib.nullcontext()):
                model(student, teacher)["loss"].backward()
            torch.cuda.set_rng_state(state)
            with amp():
                twin(twin_student, teacher)["loss"].backward()
            assert buffer_error(student.grad, twin_student.grad) <= tolerance, (step, index)
        error = gradient_error({n: p.grad for n, p in head.named_parameters()},
                               {n: p.grad for n, p in twin.named_parameters()})
        assert error <= tolerance, f"step {step}: accumulated .grad differs by {error:.3g}"
        for (name, ours), theirs in zip(head.named_buffers(), twin.buffers()):
            assert buffer_error(ours, theirs) <= tolerance, f"step {step}: buffer {name}"
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert graphed.path == "graphed Triton" and graphed.fallback_reason is None, graphed.self_checks
    assert all(v["passed"] and v["pool_bytes"] > 0 for v in graphed.self_checks.values()), graphed.self_checks
    return graphed


def test_graphed_triton_head_accumulates_like_the_eager_one_over_ten_steps():
    _train()


def test_graphed_triton_head_under_bf16_autocast():
    _train(steps=3, autocast=torch.bfloat16, tolerance=LOW_PRECISION_TOLERANCE)


def test_graphed_triton_head_on_channels_last_features():
    _train(steps=3, channels_last=True)


def test_a_new_shape_mid_run_is_captured_and_the_first_keeps_replaying():
    graphed = _train(steps=6, batch_of=lambda step: 8 if step < 3 or step == 5 else 6)
    assert len(graphed._graphs) == 2 and len(graphed.self_checks) == 2


def test_graphed_triton_head_under_ddp_world_size_one_nccl(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        holder = {}

        def wrap(graphed):
            holder["ddp"] = DistributedDataParallel(graphed)  # graph before DDP
            return holder["ddp"]
        _train(steps=3, wrap=wrap, no_sync=lambda: holder["ddp"].no_sync())
    finally:
        dist.destroy_process_group()
