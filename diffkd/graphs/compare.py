"""Comparing one step of a head with another: the self-check of CUDAGraphHead, and the benchmarks' equality checks.

A step is one forward+backward (``record_step``); two steps agree when every output, the student feature's
gradient, the parameter gradients (as one vector) and every buffer are within a relative tolerance, counters
(``num_batches_tracked``) exactly (``compare_steps``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

SELF_CHECK_TOLERANCE = 1e-3  # relative error; the same kernels differ only by reduction order (atomics, TF32)


class GraphingFailed(RuntimeError):
    """Capture or self-check did not succeed; the message says why."""


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when expected is zero; inf when shapes differ or
    ``actual`` is not finite)."""
    if actual.shape != expected.shape:
        return math.inf
    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    scale = e.norm().item()
    return (a - e).norm().item() / (scale if scale > 0 else 1.0)


@dataclass
class StepRecord:
    """What one forward+backward of a head produced: outputs, the student feature's gradient, the parameter
    gradients by name (None: no gradient reached it) and the buffers afterwards."""
    outputs: dict[str, torch.Tensor]
    input_grad: torch.Tensor | None
    param_grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]


def gradient_error(actual: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor | None]) -> float:
    """Relative error of all gradients as one vector (every parameter in proportion to its gradient); inf when
    a gradient reaches a parameter in one step and not in the other."""
    if set(actual) != set(expected) or any((actual[n] is None) != (expected[n] is None) for n in expected):
        return math.inf
    pairs = [(actual[n].double(), expected[n].double()) for n in expected if expected[n] is not None]
    if not pairs:
        return 0.0
    if not all(bool(torch.isfinite(a).all()) and a.shape == e.shape for a, e in pairs):
        return math.inf
    difference = math.sqrt(sum((a - e).norm().item() ** 2 for a, e in pairs))
    scale = math.sqrt(sum(e.norm().item() ** 2 for _, e in pairs))
    return difference / (scale if scale > 0 else 1.0)


def buffer_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.is_floating_point():
        return relative_error(actual, expected)
    return 0.0 if torch.equal(actual, expected) else math.inf  # counters (num_batches_tracked) must match exactly


def compare_steps(graphed: StepRecord, eager: StepRecord, tolerance: float = SELF_CHECK_TOLERANCE) -> dict:
    """The self-check's verdict: ``{"passed", "worst", "worst_of", "tolerance", "errors", "reason"}`` (``worst_of``
    names the worst entry, None when nothing differs).

    ``errors`` holds one relative error per output (``output <key>``), ``input grad``, ``parameter grads`` (one
    vector) and ``buffer <name>``; a missing or extra output, gradient or buffer counts as an infinite error.
    """
    errors: dict[str, float] = {}
    for key in sorted(set(graphed.outputs) | set(eager.outputs)):
        if key in graphed.outputs and key in eager.outputs:
            errors[f"output {key}"] = relative_error(graphed.outputs[key].float(), eager.outputs[key].float())
        else:
            errors[f"output {key}"] = math.inf
    if (graphed.input_grad is None) != (eager.input_grad is None):
        errors["input grad"] = math.inf
    elif eager.input_grad is not None:
        errors["input grad"] = relative_error(graphed.input_grad, eager.input_grad)
    errors["parameter grads"] = gradient_error(graphed.param_grads, eager.param_grads)
    for name in sorted(set(graphed.buffers) | set(eager.buffers)):
        both = name in graphed.buffers and name in eager.buffers
        errors[f"buffer {name}"] = buffer_error(graphed.buffers[name], eager.buffers[name]) if both else math.inf
    worst_of = max(errors, key=lambda k: errors[k])
    worst = errors[worst_of]
    worst_of = worst_of if worst > 0 else None  # nothing differs
    passed = worst <= tolerance
    reason = None if passed else f"{worst_of} differs from eager: relative error {worst:.3g} > {tolerance:g}"
    return {"passed": passed, "worst": worst, "worst_of": worst_of, "tolerance": tolerance, "errors": errors,
            "reason": reason}


def record_step(call: Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]], head: nn.Module,
                student: torch.Tensor, teacher: torch.Tensor) -> StepRecord:
    """Runs ``call(student, teacher)`` and the gradient of its ``loss`` with ``torch.autograd.grad`` (``.grad`` is
    untouched), on a fresh copy of ``student``; returns copies of everything it produced."""
    student = student.detach().clone().requires_grad_(student.requires_grad)
    outputs = call(student, teacher)
    if "loss" not in outputs:
        raise GraphingFailed(f"the head's output has no 'loss' (keys: {', '.join(outputs)})")
    named = [(name, p) for name, p in head.named_parameters() if p.requires_grad]
    wanted = ([student] if student.requires_grad else []) + [p for _, p in named]
    loss = outputs["loss"]
    grads = list(torch.autograd.grad(loss, wanted, allow_unused=True)) if loss.requires_grad and wanted else \
        [None] * len(wanted)
    input_grad = grads.pop(0) if student.requires_grad else None

    def copy(t):
        return None if t is None else t.detach().clone()
    return StepRecord({key: copy(value) for key, value in outputs.items()}, copy(input_grad),
                      {name: copy(g) for (name, _), g in zip(named, grads)},
                      {name: copy(b) for name, b in head.named_buffers()})
