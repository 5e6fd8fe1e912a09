"""A CPU model of ``torch.cuda.make_graphed_callables`` that keeps PyTorch's buffer semantics exactly, and a CPU
stand-in for diffkd's CUDA runtime seam built on it.

What the model keeps from ``torch/cuda/graphs.py`` (torch 2.14), line for line where it matters:
- the sample args *are* the static inputs; a replay copies a user arg into its static input only when their
  ``data_ptr`` differ (so parameter aliases, which share storage, are never copied);
- warm-up iterations on the sample args, with ``torch.empty_like`` output gradients;
- the outputs of the capture are the static outputs, and every replay returns them ``.detach()``-ed after
  overwriting them in place;
- the backward copies the incoming gradients into static gradient-output buffers (unless already there), "replays"
  the backward into the static gradient-input buffers made at capture, and returns them ``.detach()``-ed, i.e.
  aliases of memory that the next replay overwrites (the root of PyTorch issue 181723);
- one autograd node per replay; its backward differentiates the activations of the *latest* replay, as a CUDA
  graph's backward reads the one set of activations its forward wrote;
- a replay runs what the capture recorded: the step under the autocast state of the capture (whose cache is off),
  whatever autocast state the caller has at replay.
A real capture runs no kernel; this model runs the step at capture, so its effects on buffers and the random
state happen there (the wrapper restores both after capturing, as it must on a GPU for the warm-up).
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree


def make_graphed_callable_on_cpu(step, sample_args: tuple, num_warmup_iters: int = 3,
                                 allow_unused_input: bool = False):
    """``torch.cuda.make_graphed_callables(step, sample_args, ...)`` for one Python function, on a CPU."""
    static_inputs = tuple(sample_args)
    wanted = tuple(i for i in static_inputs if i.requires_grad)
    for _ in range(num_warmup_iters):
        outputs = pytree.tree_leaves(step(*sample_args))
        differentiable = tuple(o for o in outputs if o.requires_grad)
        if differentiable:
            torch.autograd.grad(differentiable, wanted, tuple(torch.empty_like(o) for o in differentiable),
                                only_inputs=True, allow_unused=allow_unused_input)
    # "capture" of the forward: its outputs are the static outputs.
    static_outputs, spec = pytree.tree_flatten(step(*sample_args))
    static_outputs = tuple(static_outputs)
    static_grad_outputs = tuple(torch.empty_like(o) if o.requires_grad else None for o in static_outputs)
    # "capture" of the backward: its results are the static gradient inputs, one buffer per input.
    differentiable = tuple(o for o in static_outputs if o.requires_grad)
    grads = iter(torch.autograd.grad(differentiable, wanted, tuple(g for g in static_grad_outputs if g is not None),
                                     only_inputs=True, allow_unused=allow_unused_input) if differentiable else ())
    static_grad_inputs = tuple(next(grads) if i.requires_grad else None for i in static_inputs)
    # Buffers the graph owns, as in its memory pool (oneDNN's CPU bf16 backward can return gradients over memory
    # it reuses later).
    static_grad_inputs = tuple(None if g is None else g.clone() for g in static_grad_inputs)
    graph = _Graph(step, static_inputs, static_outputs, static_grad_outputs, static_grad_inputs,
                   (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            return graph.replay_forward(inputs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            return graph.replay_backward(grads)

    def functionalized(*user_args):
        return pytree.tree_unflatten(Graphed.apply(*pytree.arg_tree_leaves(*user_args)), spec)
    return functionalized


class _Graph:
    """The static buffers of one capture and the two "replays" that overwrite them."""

    def __init__(self, step, static_inputs, static_outputs, static_grad_outputs, static_grad_inputs, autocast):
        self.step, self.static_inputs, self.static_outputs = step, static_inputs, static_outputs
        self.autocast_enabled, self.autocast_dtype = autocast
        self.static_grad_outputs, self.static_grad_inputs = static_grad_outputs, static_grad_inputs
        self.live_outputs = None

    def replay_forward(self, inputs) -> tuple:
        for static, given in zip(self.static_inputs, inputs):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        with torch.enable_grad(), torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast_enabled,
                                                 cache_enabled=False):
            self.live_outputs = pytree.tree_leaves(self.step(*self.static_inputs))
        with torch.no_grad():
            for static, live in zip(self.static_outputs, self.live_outputs):
                static.copy_(live)
        return tuple(o.detach() for o in self.static_outputs)

    def replay_backward(self, grads) -> tuple:
        for static, grad in zip(self.static_grad_outputs, grads):
            if static is not None and static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        pairs = [(o, g) for o, g in zip(self.live_outputs, self.static_grad_outputs) if g is not None]
        wanted = [i for i in self.static_inputs if i.requires_grad]
        computed = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        with torch.no_grad():
            for static_input, buffer in zip(self.static_inputs, self.static_grad_inputs):
                value = next(computed) if static_input.requires_grad else None
                if buffer is not None and value is not None:
                    buffer.copy_(value)
        return tuple(b.detach() if b is not None else None for b in self.static_grad_inputs)
