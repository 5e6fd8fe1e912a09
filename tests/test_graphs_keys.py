"""CUDAGraphHead per key: what the key holds, a failure at one key leaving the others graphed, the cap on live keys,
errors of the bare head raised as eagerly, uncaptured copies, and torch.compile running the wrapper as a graph
break.  Through the faithful CPU model of make_graphed_callables (tests/graph_emulation.py)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from diffkd import CUDAGraphHead
from test_graphs import _features, _graphed, _head, _step

S_SHAPE, T_SHAPE = (4, 8, 3, 3), (4, 16, 3, 3)


def _batch(batch: int, seed: int = 0):
    return _features((batch, *S_SHAPE[1:]), (batch, *T_SHAPE[1:]), seed)


def test_a_capture_failing_at_one_shape_leaves_the_others_graphed():
    wrapped = _graphed(_head("feature")[0], capture_error=RuntimeError("out of memory"), fail_batch=6)
    _step(wrapped, *_batch(4), seed=0)
    assert wrapped.path == "graphed torch"
    with pytest.warns(RuntimeWarning, match=r"other keys stay graphed\): capturing student \[6, .* out of memory"):
        _step(wrapped, *_batch(6), seed=1)
    assert wrapped.path == "eager torch" and "out of memory" in wrapped.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason
        _step(wrapped, *_batch(6), seed=2)
        assert wrapped.path == "eager torch" and wrapped._runtime.captures == 2  # not captured again
        _step(wrapped, *_batch(4), seed=3)
    assert wrapped.path == "graphed torch" and wrapped.fallback_reason is None and wrapped._runtime.captures == 2


def test_the_bare_heads_errors_are_raised_not_turned_into_fallbacks():
    wrapped = _graphed(_head("feature")[0])
    with pytest.raises(ValueError, match="a batch of one cannot be trained"):
        wrapped(*_batch(1))
    with pytest.raises(ValueError, match="teacher feature has 8 channels"):
        wrapped(_batch(4)[0], _batch(4)[0])
    assert not wrapped._eager_keys and wrapped.fallback_reason is None
    _step(wrapped, *_batch(4), seed=0)
    assert wrapped.path == "graphed torch"


def test_live_keys_are_capped_least_recently_used_first():
    wrapped = CUDAGraphHead(_head("feature")[0], max_graphs=2)
    wrapped._runtime = _graphed(_head("feature")[0])._runtime
    for batch in (2, 3, 2, 4):  # 3 is the least recently used when 4 arrives
        _step(wrapped, *_batch(batch), seed=batch)
    assert [key.features[0][0][0] for key in wrapped._graphs] == [2, 4]
    _step(wrapped, *_batch(3), seed=5)
    assert wrapped._runtime.captures == 4 and len(wrapped._graphs) == 2
    assert all(verdict["pool_bytes"] is None for verdict in wrapped.self_checks.values())  # no pool on a CPU
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphHead(_head("feature")[0], max_graphs=0)


@pytest.mark.parametrize("change", ["unfreeze a parameter", "eval one submodule", "kd_weight", "temperature",
                                    "inference steps"])
def test_the_key_holds_what_a_capture_bakes_in(change):
    head = _head("feature")[0]
    head.trans.weight.requires_grad_(False)
    wrapped = _graphed(head)
    _step(wrapped, *_batch(4), seed=0)
    if change == "unfreeze a parameter":
        head.trans.weight.requires_grad_(True)
    elif change == "eval one submodule":
        head.proj[1].eval()
    elif change == "kd_weight":
        head.kd_weight = 2.0
    elif change == "temperature":
        head.temperature = 4.0
    else:
        head._step_a = [a * 0.5 for a in head._step_a]
    twin = copy.deepcopy(head)
    ours = _step(wrapped, *_batch(4, 1), seed=1)
    theirs = _step(twin, *_batch(4, 1), seed=1)
    assert wrapped._runtime.captures == 2 and len(wrapped._graphs) == 2
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-5) for k in ours)
    if change == "unfreeze a parameter":
        assert torch.allclose(head.trans.weight.grad, twin.trans.weight.grad, rtol=1e-4, atol=1e-6)


def test_a_deep_copy_is_uncaptured_and_replays_on_its_own_parameters():
    head = _head("feature")[0]
    wrapped = _graphed(head)
    _step(wrapped, *_batch(4), seed=0)
    twin = copy.deepcopy(wrapped)
    assert not twin._graphs and not twin.self_checks and twin.last_path is None
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.parameters(), wrapped.parameters()))
    _step(twin, *_batch(4), seed=1)
    assert twin.path == "graphed torch" and twin._runtime.captures == 2  # the runtime stand-in is copied too
    assert all(p.grad is not None for p in twin.head.parameters() if p.requires_grad)


def test_torch_compile_runs_the_wrapper_as_a_graph_break():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(3, 3)  # over the maps' last dimension
            self.distill = CUDAGraphHead(_head("feature")[0])

        def forward(self, student, teacher):
            return self.distill(self.stem(student), teacher)["loss"]

    traced = []

    def record(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    model = Model()
    student, teacher = _batch(4)
    compiled = torch.compile(model, backend=record)
    torch.manual_seed(0)
    loss = compiled(student, teacher)
    torch.manual_seed(0)
    assert torch.equal(loss, model(student, teacher))
    assert any("linear" in target for target in traced)  # the model around the wrapper was traced
    assert not any("conv" in target or "batch_norm" in target for target in traced)  # the head was not
