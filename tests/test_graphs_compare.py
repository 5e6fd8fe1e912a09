"""The step comparison behind CUDAGraphHead's self-check and the benchmarks' equality checks (diffkd.graphs.compare)."""
from __future__ import annotations

import math

import pytest
import torch

from diffkd.graphs import GraphingFailed, StepRecord, compare_steps, record_step
from test_graphs import _features, _head


def _record(**overrides) -> StepRecord:
    base = StepRecord(outputs={"loss": torch.tensor(2.0), "gamma": torch.tensor([0.5, 0.25])},
                      input_grad=torch.tensor([1.0, -1.0]),
                      param_grads={"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])},
                      buffers={"bn.running_mean": torch.tensor([0.1, 0.2]), "bn.num_batches_tracked": torch.tensor(3)})
    for field, value in overrides.items():
        setattr(base, field, value)
    return base


def test_compare_steps_passes_equal_records_and_names_the_worst_difference():
    verdict = compare_steps(_record(), _record())
    assert verdict["passed"] and verdict["worst"] == 0 and verdict["reason"] is None and verdict["worst_of"] is None
    assert set(verdict["errors"]) == {"output gamma", "output loss", "input grad", "parameter grads",
                                      "buffer bn.num_batches_tracked", "buffer bn.running_mean"}
    # parameter gradients are one vector: |(0.05, 0)| / |(3, 4, 0)| = 0.01
    verdict = compare_steps(_record(param_grads={"w": torch.tensor([3.05, 4.0]), "b": torch.tensor([0.0])}),
                            _record(), tolerance=1e-3)
    assert not verdict["passed"] and verdict["worst_of"] == "parameter grads"
    assert math.isclose(verdict["worst"], 0.01, rel_tol=1e-6)
    assert "parameter grads differs from eager: relative error 0.01 > 0.001" == verdict["reason"]
    assert compare_steps(_record(outputs={"loss": torch.tensor(2.0001), "gamma": torch.tensor([0.5, 0.25])}),
                         _record(), tolerance=1e-3)["passed"]


@pytest.mark.parametrize("overrides, worst_of", [
    (dict(buffers={"bn.running_mean": torch.tensor([0.1, 0.2]), "bn.num_batches_tracked": torch.tensor(4)}),
     "buffer bn.num_batches_tracked"),
    (dict(outputs={"loss": torch.tensor(2.0)}), "output gamma"),
    (dict(outputs={"loss": torch.tensor(math.nan), "gamma": torch.tensor([0.5, 0.25])}), "output loss"),
    (dict(param_grads={"w": torch.tensor([3.0, 4.0]), "b": None}), "parameter grads"),
    (dict(input_grad=None), "input grad"),
])
def test_compare_steps_fails_missing_or_non_finite_values(overrides, worst_of):
    verdict = compare_steps(_record(**overrides), _record())
    assert not verdict["passed"] and verdict["worst_of"] == worst_of and verdict["worst"] == math.inf


def test_record_step_leaves_grad_untouched_and_needs_a_loss():
    head, s_shape, t_shape = _head("feature")
    student, teacher = _features(s_shape, t_shape)
    record = record_step(head, head, student, teacher)
    assert student.grad is None and all(p.grad is None for p in head.parameters())
    assert record.input_grad.shape == s_shape and set(record.param_grads) == {n for n, _ in head.named_parameters()}
    with pytest.raises(GraphingFailed, match="no 'loss'"):
        record_step(lambda s, t: {"kd": s.sum()}, head, student, teacher)
