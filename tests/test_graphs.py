"""CUDAGraphHead: transparent on a CPU, state-dict transparent everywhere, and its capture / self-check / fallback
logic exercised on a CPU through a faithful model of torch.cuda.make_graphed_callables (tests/graph_emulation.py:
static inputs, static outputs returned detached, static gradient buffers returned detached and overwritten by
the next replay), so that gradient accumulation meets the same aliasing as on a GPU.  Real CUDA graphs are tested
in tests/test_graphs_gpu.py.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import diffkd
import kernels
from diffkd import CUDAGraphHead, DiffKDHead, load_official_state_dict
from diffkd.graphs import gradient_error, head_path, owned_copies
from graph_emulation import make_graphed_callable_on_cpu

SHAPES = {"feature": (dict(student_channels=8, teacher_channels=16), (4, 8, 3, 3), (4, 16, 3, 3)),
          "feature-ae": (dict(student_channels=8, teacher_channels=16, use_ae=True, ae_channels=12), (4, 8, 3, 3),
                         (4, 16, 3, 3)),
          "logit": (dict(student_channels=10, teacher_channels=10, kernel_size=1, distance="kl"), (4, 10), (4, 10))}


def _head(kind="feature", **overrides):
    kwargs, student_shape, teacher_shape = SHAPES[kind]
    return DiffKDHead(**{**kwargs, "backend": "torch", **overrides}), student_shape, teacher_shape


def _features(student_shape, teacher_shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(student_shape, generator=generator).requires_grad_(),
            torch.randn(teacher_shape, generator=generator))


def _step(module, student, teacher, seed, **kwargs):
    """One forward+backward from a fixed random state; returns the outputs (detached copies)."""
    torch.manual_seed(seed)
    out = module(student, teacher, **kwargs)
    out["loss"].backward()
    return {k: v.detach().clone() for k, v in out.items()}


def _assert_same_state(a: nn.Module, b: nn.Module, exact: bool = True):
    """Same buffers, parameters and gradients: bit for bit, or (``exact=False``) within 1e-4 relative error, the
    floating-point state as one vector and the gradients as another (a BatchNorm bias whose gradient is rounding
    noise has no relative error of its own); counters exactly."""
    states = [m.state_dict() for m in (a, b)]
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (a, b)]
    if exact:
        assert all(torch.equal(x, states[1][n]) for n, x in states[0].items())
        assert all((g is None and grads[1][n] is None) or torch.equal(g, grads[1][n]) for n, g in grads[0].items())
        return
    counters = [{n: x for n, x in state.items() if not x.is_floating_point()} for state in states]
    assert all(torch.equal(x, counters[1][n]) for n, x in counters[0].items())
    floats = [{n: x for n, x in state.items() if x.is_floating_point()} for state in states]
    assert gradient_error(*floats) < 1e-4 and gradient_error(*grads) < 1e-4


# ---- the CPU stand-in of diffkd.graphs.runtime.CudaGraphRuntime ------------------------------------------------
class CPUGraphs:
    """Captures with the faithful CPU model; ``capture_error`` makes capture raise, ``fail_batch`` makes it raise
    only for that batch size, ``loss_offset`` makes every replay's loss wrong (so the self-check fails)."""

    def __init__(self, capture_error: Exception | None = None, loss_offset: float = 0.0, fail_batch: int | None = None):
        self.capture_error, self.loss_offset, self.fail_batch = capture_error, loss_offset, fail_batch
        self.captures = 0

    @staticmethod
    def handles(*tensors):
        return True

    @staticmethod
    def rng_state(device):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device):
        torch.set_rng_state(state)

    @staticmethod
    def pool_bytes(pool, device):
        return None  # no memory pool on a CPU

    def capture(self, step, sample_args, warmup_iterations, device):
        self.captures += 1
        self.autocast_at_capture = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                                    torch.is_autocast_cache_enabled())
        if self.capture_error is not None and self.fail_batch in (None, sample_args[0].shape[0]):
            raise self.capture_error
        if self.loss_offset:
            def offset_step(*args, _step=step):
                outputs = _step(*args)
                return {**outputs, "loss": outputs["loss"] + self.loss_offset}
            return make_graphed_callable_on_cpu(offset_step, sample_args, warmup_iterations, True), None
        return make_graphed_callable_on_cpu(step, sample_args, warmup_iterations, True), None


def _graphed(head, **runtime):
    wrapped = CUDAGraphHead(head)
    wrapped._runtime = CPUGraphs(**runtime)
    return wrapped


# ---- CPU: a transparent pass-through ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SHAPES))
def test_cpu_pass_through_is_bit_identical_to_the_bare_head(kind):
    head, s_shape, t_shape = _head(kind)
    twin = copy.deepcopy(head)
    wrapped = CUDAGraphHead(head)
    for seed in range(2):  # gradients accumulate over two micro-batches, as in eager
        student, teacher = _features(s_shape, t_shape, seed)
        twin_student = student.detach().clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = _step(wrapped, student, teacher, seed=seed)
        theirs = _step(twin, twin_student, teacher, seed=seed)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert torch.equal(student.grad, twin_student.grad)
    _assert_same_state(head, twin)
    assert head.proj[1].num_batches_tracked.item() == 2
    assert wrapped.path == "eager torch" and wrapped._graphs == {}
    assert wrapped.eager_reason == "the features are not CUDA tensors"


def test_cpu_pass_through_keeps_explicit_noise_and_eval_mode():
    head, s_shape, t_shape = _head("feature")
    wrapped = CUDAGraphHead(head)
    student, teacher = _features(s_shape, t_shape)
    noises = {"blend_noise": torch.randn(4, 16, 3, 3), "diffusion_noise": torch.randn(4, 16, 3, 3),
              "diffusion_t": torch.randint(0, 1000, (4,))}
    ours, theirs = wrapped(student, teacher, **noises), head(student, teacher, **noises)
    assert torch.equal(ours["loss"], theirs["loss"])
    wrapped.eval()
    assert not head.training
    with torch.no_grad():
        assert torch.equal(wrapped(student, teacher, **noises)["denoised"], head(student, teacher, **noises)["denoised"])


def test_bad_inputs_still_get_the_heads_error():
    head, s_shape, _ = _head("feature")
    with pytest.raises(ValueError, match="teacher feature has 8 channels"):
        CUDAGraphHead(head)(torch.randn(s_shape), torch.randn(s_shape))


def test_wrapper_refuses_nonsense():
    head, _, _ = _head("feature")
    with pytest.raises(ValueError, match="already a CUDAGraphHead"):
        CUDAGraphHead(CUDAGraphHead(head))
    with pytest.raises(ValueError, match="warmup_iterations"):
        CUDAGraphHead(head, warmup_iterations=0)
    with pytest.raises(ValueError, match="nn.Module"):
        CUDAGraphHead(lambda s, t: {})


# ---- state dict and parameters: the bare head's ------------------------------------------------------------------
def test_state_dict_keys_and_parameters_are_the_bare_heads():
    head, _, _ = _head("feature-ae")
    wrapped = CUDAGraphHead(head)
    assert list(wrapped.state_dict()) == list(head.state_dict())
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in head.parameters()]
    assert wrapped.state_dict()._metadata == head.state_dict()._metadata


def test_state_dict_loads_both_ways_and_inside_a_parent():
    source, _, _ = _head("feature-ae")
    target, _, _ = _head("feature-ae")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
        source.proj[1].num_batches_tracked.fill_(7)
    wrapped = CUDAGraphHead(target)
    wrapped.load_state_dict(source.state_dict())  # bare -> wrapped, strict
    _assert_same_state(target, source)
    bare, _, _ = _head("feature-ae")
    bare.load_state_dict(wrapped.state_dict())    # wrapped -> bare, strict
    _assert_same_state(bare, source)
    load_official_state_dict(CUDAGraphHead(_head("feature-ae")[0]), source.state_dict())

    parent, bare_parent = nn.ModuleDict({"feature": wrapped}), nn.ModuleDict({"feature": bare})
    assert list(parent.state_dict()) == list(bare_parent.state_dict())
    assert all(k.startswith("feature.") and ".head." not in k for k in parent.state_dict())
    fresh = nn.ModuleDict({"feature": CUDAGraphHead(_head("feature-ae")[0])})
    fresh.load_state_dict(bare_parent.state_dict())
    _assert_same_state(fresh["feature"].head, source)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**bare_parent.state_dict(), "feature.bogus": torch.zeros(1)})


# ---- paths -------------------------------------------------------------------------------------------------------
def test_paths_of_bare_and_wrapped_heads():
    head, s_shape, t_shape = _head("feature", backend="auto")
    assert head_path(head) == "eager torch"
    assert head_path(DiffKDHead(8, 8, backend="triton"), "cpu") == "eager Triton"  # conftest: the interpreter
    assert head_path(head, "cuda") == "eager torch"  # "auto" picks the kernels only inside a graph
    wrapped = CUDAGraphHead(head)
    assert wrapped.last_path is None and wrapped.path == "eager torch"
    assert head_path(wrapped, "cuda") == ("graphed Triton" if kernels._common.triton_importable()
                                          else "graphed torch")
    assert head_path(CUDAGraphHead(_head("feature")[0]), "cuda") == "graphed torch"
    assert head_path(CUDAGraphHead(_head("feature", check_finite=True)[0]), "cuda") == "eager torch"
    wrapped(*_features(s_shape, t_shape))
    assert wrapped.last_path == wrapped.path == head_path(wrapped) == "eager torch"


# ---- the capture, self-check and fallback logic, through the CPU emulation -------------------------------------
@pytest.mark.parametrize("kind", list(SHAPES))
def test_graphed_steps_equal_eager_steps_and_leave_one_step_of_state(kind):
    head, s_shape, t_shape = _head(kind)
    twin = copy.deepcopy(head)
    wrapped = _graphed(head)
    ours_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for seed in range(3):
        for micro_batch in range(2):  # gradient accumulation over two micro-batches, then an optimizer step
            student, teacher = _features(s_shape, t_shape, 10 * seed + micro_batch)
            twin_student = student.detach().clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ours = _step(wrapped, student, teacher, seed=seed * 100 + micro_batch)
            after_ours = torch.get_rng_state()
            theirs = _step(twin, twin_student, teacher, seed=seed * 100 + micro_batch)
            assert torch.equal(after_ours, torch.get_rng_state())  # one step's random numbers, no more
            assert ours.keys() == theirs.keys()
            # Equal up to rounding: the replay's backward sums a parameter's contributions in another order, and
            # three optimizer steps through train-mode BatchNorm amplify that to ~1e-5.
            for key in ours:
                assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5), key
            assert torch.allclose(student.grad, twin_student.grad, rtol=1e-4, atol=1e-5)
        _assert_same_state(head, twin, exact=False)
        ours_opt.step(), twin_opt.step()
        ours_opt.zero_grad(), twin_opt.zero_grad()
    assert head.proj[1].num_batches_tracked.item() == 6
    assert wrapped.path == "graphed torch" and wrapped.fallback_reason is None
    assert wrapped._runtime.captures == 1  # one key: captured once, replayed five times more
    [(description, verdict)] = wrapped.self_checks.items()
    assert verdict["passed"] and verdict["worst"] < 1e-5, verdict
    assert "student [4, " in description and "buffer proj.1.num_batches_tracked" in verdict["errors"]


def test_outputs_match_eager_requires_grad_and_small_ones_survive_the_next_replay():
    head, s_shape, t_shape = _head("feature")
    wrapped = _graphed(head)
    first = wrapped(*_features(s_shape, t_shape, 0))
    eager = copy.deepcopy(head)(*_features(s_shape, t_shape, 0))
    assert {k: v.requires_grad for k, v in first.items()} == {k: v.requires_grad for k, v in eager.items()}
    first["loss"].backward()
    kept = {k: v.detach().clone() for k, v in first.items()}
    wrapped(*_features(s_shape, t_shape, 1))["loss"].backward()
    for key in ("loss", "kd_loss", "diffusion_loss", "gamma"):
        assert torch.equal(first[key], kept[key]), key  # copies, not the replay's buffers
    assert not torch.equal(first["denoised"], kept["denoised"])  # a map is the static buffer: valid until next call


def test_a_new_shape_is_captured_and_checked_on_its_own():
    head, s_shape, t_shape = _head("feature")
    wrapped = _graphed(head)
    for batch in (4, 6, 4):
        student, teacher = _features((batch, *s_shape[1:]), (batch, *t_shape[1:]))
        wrapped(student, teacher)["loss"].backward()
    assert wrapped._runtime.captures == 2 and len(wrapped.self_checks) == 2
    assert all(v["passed"] for v in wrapped.self_checks.values())
    wrapped.to(torch.float32)  # a conversion may move storage: the graphs are dropped and captured again
    wrapped(*_features(s_shape, t_shape))["loss"].backward()
    assert wrapped._runtime.captures == 3


def test_autocast_is_part_of_the_key_and_captured_without_its_cache():
    head, s_shape, t_shape = _head("feature")
    twin = copy.deepcopy(head)
    wrapped = _graphed(head)
    student, teacher = _features(s_shape, t_shape)
    twin_student = student.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _step(wrapped, student, teacher, seed=3)
        theirs = _step(twin, twin_student, teacher, seed=3)
    assert wrapped._runtime.autocast_at_capture == (True, torch.bfloat16, False)
    [(description, verdict)] = wrapped.self_checks.items()
    assert description.endswith("autocast bfloat16") and verdict["passed"]
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-2, atol=1e-3) for k in ours)
    _step(wrapped, student, teacher, seed=4)  # without autocast: a new key
    assert wrapped._runtime.captures == 2


def test_gradients_reach_ddp_through_the_replays(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        head, s_shape, t_shape = _head("feature")
        twin = copy.deepcopy(head)
        model = DistributedDataParallel(_graphed(head))  # graph before DDP: wrap the head, then the model
        ours = _step(model, *_features(s_shape, t_shape), seed=7)
        theirs = _step(twin, *_features(s_shape, t_shape), seed=7)
        assert model.module.path == "graphed torch" and model.module.self_checks
        assert torch.allclose(ours["loss"], theirs["loss"])
        _assert_same_state(head, twin, exact=False)  # DDP's hooks saw every gradient (averaged over one rank)
    finally:
        dist.destroy_process_group()


def test_eval_no_grad_and_explicit_noise_are_not_captured():
    head, s_shape, t_shape = _head("feature")
    wrapped = _graphed(head)
    student, teacher = _features(s_shape, t_shape)
    with torch.no_grad():
        wrapped(student, teacher)
    wrapped(student, teacher, generator=torch.Generator().manual_seed(0))
    wrapped.eval()
    wrapped(student, teacher)
    assert wrapped._runtime.captures == 0 and wrapped.path == "eager torch" and wrapped.eager_reason == "eval mode"


class _Disagreeing(nn.Module):
    """A head whose output carries a Python float: not capturable."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, student, teacher):
        loss = (self.proj(student) - teacher).pow(2).mean()
        return {"loss": loss, "note": 1.0}


@pytest.mark.parametrize("runtime, head_kwargs, reason", [
    (dict(capture_error=RuntimeError("operation not permitted when stream is capturing")), {},
     "raised RuntimeError: operation not permitted when stream is capturing"),
    (dict(loss_offset=0.5), {}, "the self-check failed for student [4, 8, 3, 3] float32 (requires grad), teacher "
                                "[4, 16, 3, 3] float32, cpu: output loss differs from eager"),
    ({}, dict(check_finite=True), "check_finite=True"),
])
def test_a_failing_capture_or_self_check_falls_back_once_and_leaves_one_eager_step(runtime, head_kwargs, reason):
    head, s_shape, t_shape = _head("feature", **head_kwargs)
    twin = copy.deepcopy(head)
    wrapped = _graphed(head, **runtime)
    with pytest.warns(RuntimeWarning) as caught:
        for seed in range(3):
            student, teacher = _features(s_shape, t_shape, seed)
            twin_student = student.detach().clone().requires_grad_()
            ours, theirs = _step(wrapped, student, teacher, seed), _step(twin, twin_student, teacher, seed)
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
            assert torch.equal(student.grad, twin_student.grad)
    assert len(caught) == 1 and "runs these features eagerly" in str(caught[0].message)
    assert reason in str(caught[0].message) and reason in wrapped.fallback_reason
    _assert_same_state(head, twin)  # warm-up and check steps left no trace: exactly the eager steps
    assert wrapped._runtime.captures <= 1 and wrapped.path == "eager torch"


def test_a_head_returning_non_tensors_falls_back():
    wrapped = _graphed(_Disagreeing())
    with pytest.warns(RuntimeWarning, match=r"non-tensor values \(note\)"):
        out = wrapped(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))
    assert out["note"] == 1.0 and wrapped.path == "eager torch"


def test_a_call_before_the_previous_backward_runs_eagerly_and_keeps_gradients_right():
    head, s_shape, t_shape = _head("feature")
    twin = copy.deepcopy(head)
    wrapped = _graphed(head)
    _step(wrapped, *_features(s_shape, t_shape, 9), seed=9)  # captured and replayed once, backward done
    _step(twin, *_features(s_shape, t_shape, 9), seed=9)
    firsts, seconds = _features(s_shape, t_shape, 0), _features(s_shape, t_shape, 1)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="before the backward of its previous call") as caught:
        total = wrapped(*firsts)["loss"] + wrapped(*seconds)["loss"]
        assert wrapped.path == "eager torch"
        total.backward()
        wrapped(*firsts)["loss"].backward()  # the guard is over: replays again, and warns no more
    assert len(caught) == 1 and wrapped.path == "graphed torch"
    twin_firsts = (firsts[0].detach().clone().requires_grad_(), firsts[1])
    twin_seconds = (seconds[0].detach().clone().requires_grad_(), seconds[1])
    torch.manual_seed(5)
    (twin(*twin_firsts)["loss"] + twin(*twin_seconds)["loss"]).backward()
    twin(*twin_firsts)["loss"].backward()
    for ours, theirs in ((firsts[0], twin_firsts[0]), (seconds[0], twin_seconds[0])):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    _assert_same_state(head, twin, exact=False)


# ---- gradient accumulation against PyTorch's buffer semantics (PyTorch issue 181723) -----------------------------
def _accumulate(module, optimizer, micro_batches, step, set_to_none, no_sync=contextlib.nullcontext):
    """One optimizer step's worth of micro-batches (the last outside ``no_sync``), from fixed features and seeds."""
    for index in range(micro_batches):
        generator = torch.Generator().manual_seed(100 * step + index)
        student, teacher = torch.randn(4, 8, 3, 3, generator=generator), torch.randn(4, 16, 3, 3, generator=generator)
        torch.manual_seed(1000 * step + index)
        with no_sync() if index + 1 < micro_batches else contextlib.nullcontext():
            module(student.requires_grad_(), teacher)["loss"].backward()
    bare = getattr(getattr(module, "module", module), "head", module)  # inside DDP and CUDAGraphHead
    grads = {n: p.grad.clone() for n, p in bare.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return grads


def _assert_accumulation_matches_the_bare_head(wrap, micro_batches, set_to_none, no_sync=None):
    head = _head("feature")[0]
    twin = copy.deepcopy(head)
    wrapped = wrap(head)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (wrapped, twin)]
    for step in range(3):
        ours = _accumulate(wrapped, optimizers[0], micro_batches, step, set_to_none,
                           no_sync or contextlib.nullcontext)
        theirs = _accumulate(twin, optimizers[1], micro_batches, step, set_to_none)
        error = gradient_error(ours, theirs)
        assert error <= 1e-5, f"step {step}: accumulated .grad differs from the bare head's by {error:.3g}"
    graphed = wrapped.module if hasattr(wrapped, "module") else wrapped
    assert graphed.path == "graphed torch" and graphed._runtime.captures == 1


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulated_gradients_equal_the_bare_heads(micro_batches, set_to_none):
    _assert_accumulation_matches_the_bare_head(_graphed, micro_batches, set_to_none)


def test_accumulated_gradients_equal_the_bare_heads_under_ddp_no_sync(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        holder = {}

        def wrap(head):
            holder["ddp"] = DistributedDataParallel(_graphed(head))  # graph before DDP
            return holder["ddp"]
        _assert_accumulation_matches_the_bare_head(wrap, 2, True, no_sync=lambda: holder["ddp"].no_sync())
    finally:
        dist.destroy_process_group()


def test_owned_copies_are_new_memory_with_the_same_values():
    grads = (torch.randn(3), None, torch.randn(2, 2))
    copies = owned_copies(grads)
    assert copies[1] is None
    for grad, copied in zip(grads[::2], copies[::2]):
        assert torch.equal(grad, copied) and grad.data_ptr() != copied.data_ptr()


def test_exported_from_the_package():
    assert diffkd.CUDAGraphHead is CUDAGraphHead and "CUDAGraphHead" in diffkd.__all__
