"""CUDAGraphHead: a DiffKD head whose training calls replay CUDA graphs of its forward and backward.

    head = CUDAGraphHead(DiffKDHead(256, 256))        # same call, same dict, same state_dict keys
    out = head(student_feat, teacher_feat)            # captured on the first training call per key, then replayed
    (ce + out["loss"]).backward()                     # gradients reach student_feat and every head parameter
    print(head.path)                                  # e.g. "graphed Triton"; "eager torch" on a CPU

When it graphs.  A call is captured and replayed when the head is in training mode, gradients are enabled, both
features are CUDA tensors and no ``generator`` or explicit noise is passed.  Everything else runs the bare head
eagerly, with identical results: CPU tensors, eval mode, ``torch.no_grad()``, and calls with a ``generator`` or
explicit ``blend_noise`` / ``diffusion_noise`` / ``diffusion_t`` (a graph draws only from the device's default
generator).  One graph pair is captured per key (``diffkd.graphs.keys``: the features' shapes, strides, dtypes,
devices and ``requires_grad``, autocast, TF32, the parameters' ``requires_grad``, every submodule's training flag
and the head's Python settings such as weights, temperature and steps).  At most ``max_graphs`` keys (default 8)
stay captured; the least recently used is dropped (its memory pool with it) and captured again if it comes back.

How.  ``torch.cuda.make_graphed_callables`` (``diffkd.graphs.runtime``) captures the head after warm-up
iterations; the parameters enter the capture as leaf aliases (same storage) and the real parameters are passed
at replay, so DDP's autograd hooks on them see every gradient.  Warm-up, capture and the self-check run inside
``kernels.auto_uses_triton()`` (backend "auto" compiles its Triton kernels before capture and picks, per op, what
``kernels._common.AUTO_TRITON_IN_GRAPHS`` says), under autocast with ``cache_enabled=False`` when autocast is on.
Noise stays fresh: seeds are drawn on the device's default generator, whose Philox offset advances every replay.
Warm-up and self-check leave no trace (random state and buffers are restored): a graphed call leaves the head in
the state of exactly one step.  The gradients a replay hands back are copies, never its static buffers
(``runtime.OwnedGradients``), so accumulation over micro-batches, DDP ``no_sync`` and ``zero_grad`` either way
give the bare head's ``.grad``.

Self-check and fallback, per key.  The first call of a key compares one graphed forward+backward with one eager
step of the same kernels and random state (``compare_steps`` within ``tolerance``, 1e-3, or 3e-2 when the head
computes in 16 bits; the verdict, with the key's memory-pool size on a GPU as ``pool_bytes``, goes to
``self_checks``).  A capture or check that fails makes that key run eagerly (reason in
``fallback_reason`` and ``eager_reason``, one ``RuntimeWarning`` per distinct reason); other keys stay graphed.
An error the bare head raises for the input (a batch of one in training, wrong channels) is raised as eagerly.

Contract (kept stable for every wrapper of heads, e.g. a loss with ``graph="auto"``):
- ``CUDAGraphHead(head, *, self_check=True, warmup_iterations=3, tolerance=1e-3, max_graphs=8)``; wrap a head once.
- ``forward(student_feat, teacher_feat, *, generator=None, blend_noise=None, diffusion_noise=None,
  diffusion_t=None)`` returns the bare head's dict.  Loss terms and other outputs of at most one dimension are
  copies; maps (``denoised``, ``target``) are the graph's static buffers, valid until the next call of that key.
- One backward per call, before the next call; a call made while the previous one's backward is pending runs
  eagerly (one warning), so unusual orders stay correct.
- Parameters and buffers keep their storage (optimizers and ``load_state_dict`` work in place); ``.to()``,
  ``.half()`` and other conversions drop the graphs.  ``copy.deepcopy`` (an EMA copy) gives an uncaptured copy.
- DDP: wrap each head in CUDAGraphHead before wrapping the model.  ``torch.compile`` of a model holding the
  wrapper runs it as a graph break (``torch.compiler.disable``).
- ``state_dict()`` / ``load_state_dict()`` use the bare head's keys; ``parameters()`` are the head's own.
- ``check_finite=True`` heads read the features on the host every call, which a graph cannot capture: eager.
- Attributes: ``path`` / ``last_path`` (see ``head_path``), ``eager_reason``, ``fallback_reason``, ``self_checks``.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn

import kernels
from diffkd.graphs.compare import SELF_CHECK_TOLERANCE, GraphingFailed, compare_steps, record_step
from diffkd.graphs.keys import GraphKey, KeyReader, describe
from diffkd.graphs.paths import path_of
from diffkd.graphs.runtime import CudaGraphRuntime, OwnedGradients
from diffkd.graphs.state_dict import add_head_prefix, strip_head_prefix

WARMUP_ITERATIONS = 3  # make_graphed_callables' default
MAX_GRAPHS = 8
# The self-check's tolerance when the head computes in 16 bits (autocast or half features): bfloat16 keeps 8
# mantissa bits (eps 7.8e-3), and a graphed step whose static gradient buffers have another memory layout than
# eager's runs other kernels that round differently, a few eps apart (1.3e-2 measured on a CPU in bfloat16).
LOW_PRECISION_TOLERANCE = 3e-2
LOW_PRECISION = (torch.float16, torch.bfloat16)
EXPLICIT_RANDOMNESS = ("generator", "blend_noise", "diffusion_noise", "diffusion_t")


class _GraphedStep:
    """One captured key: the graphed callable, the parameters it takes, the outputs eager returns detached, the
    path label, and the guard against replaying over activations that a pending backward still needs."""

    def __init__(self, graphed: Callable, params: tuple, detached: frozenset, path: str, description: str):
        self.graphed, self.params, self.detached = graphed, params, detached
        self.path, self.description = path, description
        self._pending_node = None  # weak reference to the autograd node of the last replay, until its backward ran

    def backward_pending(self) -> bool:
        return self._pending_node is not None and self._pending_node() is not None

    def replay(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graphed call, its inputs routed through OwnedGradients (see there: PyTorch issue 181723)."""
        return self.graphed(*OwnedGradients.apply(student, teacher, *self.params))

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.replay(student, teacher)
        node = next((v.grad_fn for v in outputs.values() if v.grad_fn is not None), None)
        self._pending_node = None
        if node is not None:
            self._pending_node = weakref.ref(node)
            node.register_hook(self._backward_done)
        # The replay's autograd node marks every output differentiable: those eager returns detached stay detached.
        # Small outputs (loss terms, per-sample γ, diagnostics) are copied: the next replay overwrites the buffers.
        result = {}
        for key, value in outputs.items():
            value = value.detach() if key in self.detached else value
            result[key] = value.clone() if value.dim() <= 1 else value
        return result

    def _backward_done(self, *_):
        self._pending_node = None


def head_path(head: nn.Module, device: torch.device | str | None = None) -> str:
    """"eager torch", "eager Triton", "graphed torch", "graphed Triton" or "graphed Triton and torch" (some ops on
    PyTorch inside graphs, by the kernels' per-op table): the path a training call of ``head`` on ``device``
    (default: its parameters' device) runs.  For a CUDAGraphHead: the path its last call ran, or before any call
    the path it will try."""
    if not isinstance(head, CUDAGraphHead):
        return path_of(head, graphed=False, device=device)
    if head.last_path is not None:
        return head.last_path
    bare = head.head
    reference = next(bare.parameters(), None)
    device = torch.device(device) if device is not None else reference.device if reference is not None else None
    graphs = device is not None and device.type == "cuda" and not getattr(bare, "check_finite", False)
    return path_of(bare, graphed=graphs, device=device)


class CUDAGraphHead(nn.Module):
    """Wraps a DiffKD head (``head(student_feat, teacher_feat, ...) -> dict``) so that its training calls on CUDA
    replay CUDA graphs of its forward and backward; the module's documentation is the contract.

    ``self_check`` (default True) compares the first replay of each key with an eager step; ``warmup_iterations``
    are the eager iterations before each capture; ``max_graphs`` the keys kept captured (least recently used
    dropped).  ``last_path``: the path of the last call (None before the first); ``path``: the same or, before any
    call, the path the head will try; ``eager_reason``: why the last call ran eagerly (None when it replayed);
    ``fallback_reason``: why the last call's key could not be graphed (None when it could, or was not tried);
    ``self_checks``: each captured key's description → its self-check verdict (``compare_steps``, plus
    ``pool_bytes``, the key's memory pool on a GPU).
    """

    def __init__(self, head: nn.Module, *, self_check: bool = True, warmup_iterations: int = WARMUP_ITERATIONS,
                 tolerance: float = SELF_CHECK_TOLERANCE, max_graphs: int = MAX_GRAPHS):
        super().__init__()
        if isinstance(head, CUDAGraphHead):
            raise ValueError("this head is already a CUDAGraphHead; wrap the bare head once")
        if not isinstance(head, nn.Module):
            raise ValueError(f"CUDAGraphHead wraps an nn.Module head, got {type(head).__name__}")
        if not isinstance(warmup_iterations, int) or warmup_iterations < 1:
            raise ValueError(f"warmup_iterations must be a positive integer, got {warmup_iterations!r} (Triton "
                             "compiles and autotunes its kernels in the warm-up, before capture)")
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r} (each captured key holds "
                             "its own memory pool)")
        self.head = head
        self._key_of = KeyReader(head)
        self.self_check, self.warmup_iterations, self.tolerance = self_check, warmup_iterations, tolerance
        self.max_graphs = max_graphs
        self._runtime = CudaGraphRuntime()
        self._forget_captures()
        self.register_state_dict_post_hook(strip_head_prefix)
        self.register_load_state_dict_pre_hook(add_head_prefix)

    def _forget_captures(self) -> None:
        """Back to an uncaptured wrapper (at construction, and in a copy)."""
        self.last_path: str | None = None
        self.eager_reason: str | None = None
        self.fallback_reason: str | None = None
        self.self_checks: dict[str, dict] = {}
        self._graphs: OrderedDict[GraphKey, _GraphedStep] = OrderedDict()
        self._eager_keys: OrderedDict[GraphKey, str] = OrderedDict()  # keys that could not be graphed → why
        self._warned: set[str] = set()

    def __deepcopy__(self, memo):
        # A copy (an EMA head) shares no captured graph: those replay on the original's parameters and buffers.
        twin = self.__class__.__new__(self.__class__)
        memo[id(self)] = twin
        state = {k: v for k, v in self.__dict__.items() if k not in ("_graphs", "_eager_keys", "self_checks")}
        twin.__dict__.update(copy.deepcopy(state, memo))
        twin._forget_captures()
        return twin

    def extra_repr(self) -> str:
        return f"self_check={self.self_check}, graphs={len(self._graphs)}, path={self.last_path!r}"

    @property
    def path(self) -> str:
        return head_path(self)

    def _apply(self, fn, recurse=True):
        # Conversions (.to(), .half(), ...) may give parameters and buffers new storage: the graphs would replay
        # on the old one.  They are captured again on the next call.
        self._graphs.clear()
        self._eager_keys.clear()
        result = super()._apply(fn, recurse)
        self._key_of = KeyReader(self.head)  # conversions may replace parameters
        return result

    # ---- dispatch ---------------------------------------------------------------------------------------------
    def _eager_reason(self, student, teacher, explicit: dict) -> str | None:
        if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)):
            return "the features are not tensors"  # the head's own check raises the error
        if not self._runtime.handles(student, teacher):
            return "the features are not CUDA tensors"
        if explicit:
            return f"{', '.join(explicit)} given"
        if not self.training:
            return "eval mode"
        if not torch.is_grad_enabled():
            return "gradients are disabled"
        return None

    @torch.compiler.disable
    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                generator: torch.Generator | None = None, blend_noise: torch.Tensor | None = None,
                diffusion_noise: torch.Tensor | None = None,
                diffusion_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        explicit = {name: value for name, value in zip(EXPLICIT_RANDOMNESS,
                                                      (generator, blend_noise, diffusion_noise, diffusion_t))
                    if value is not None}
        self.fallback_reason = None
        self.eager_reason = self._eager_reason(student_feat, teacher_feat, explicit)
        if self.eager_reason is not None:
            return self._eager(student_feat, teacher_feat, **explicit)
        key = self._key_of(student_feat, teacher_feat)
        if key in self._eager_keys:
            self.eager_reason = self.fallback_reason = self._eager_keys[key]
            return self._eager(student_feat, teacher_feat)
        step = self._graphs.get(key)
        if step is None:
            step = self._prepare(key, student_feat, teacher_feat)
            if isinstance(step, str):
                return self._fall_back(key, step, student_feat, teacher_feat)
            self._graphs[key] = step
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)  # the least recently used key, and its memory pool
        self._graphs.move_to_end(key)
        if step.backward_pending():
            self.eager_reason = "the previous call's backward has not run yet"
            self._warn_once("CUDAGraphHead was called again before the backward of its previous call; that call "
                            "ran eagerly, because a replay would overwrite the activations the pending backward "
                            "needs (call backward once per forward, before the next forward)")
            return self._eager(student_feat, teacher_feat)
        self.last_path = step.path
        return step(student_feat, teacher_feat)

    def _eager(self, student_feat, teacher_feat, **explicit) -> dict[str, torch.Tensor]:
        if isinstance(student_feat, torch.Tensor):
            self.last_path = path_of(self.head, graphed=False, like=student_feat)
        return self.head(student_feat, teacher_feat, **explicit)

    def _fall_back(self, key: GraphKey, reason: str, student, teacher) -> dict[str, torch.Tensor]:
        """Runs the call eagerly, then marks its key eager.  An error of the bare head itself (a batch of one,
        wrong channels) is raised here, as eagerly, and marks nothing."""
        outputs = self._eager(student, teacher)
        self._eager_keys[key] = reason
        while len(self._eager_keys) > 8 * self.max_graphs:  # bounded: such keys hold no memory, only a reason
            self._eager_keys.popitem(last=False)
        self.eager_reason = self.fallback_reason = reason
        self._warn_once(f"CUDAGraphHead runs these features eagerly (other keys stay graphed): {reason}")
        return outputs

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ---- capture and self-check -------------------------------------------------------------------------------
    def _snapshot(self, device: torch.device) -> tuple:
        return self._runtime.rng_state(device), [b.detach().clone() for b in self.head.buffers()]

    @torch.no_grad()
    def _restore(self, snapshot: tuple, device: torch.device) -> None:
        rng_state, buffers = snapshot
        for buffer, saved in zip(self.head.buffers(), buffers):
            buffer.copy_(saved)
        self._runtime.set_rng_state(rng_state, device)

    def _prepare(self, key: GraphKey, student: torch.Tensor, teacher: torch.Tensor) -> _GraphedStep | str:
        """Captures ``key`` and runs its self-check: the step, or why it failed.  The head's buffers and the random
        state are as before the call either way."""
        device = student.device
        snapshot = self._snapshot(device)
        description = base = describe(key)
        taken, variant = {s.description for s in self._graphs.values()}, 1
        while description in taken:  # another key with the same features (other settings): tell them apart
            variant += 1
            description = f"{base} (variant {variant})"
        try:
            if getattr(self.head, "check_finite", False):
                raise GraphingFailed("the head has check_finite=True, which reads the features on the host on "
                                     "every call (a CUDA graph cannot capture that)")
            graphed, detached, pool = self._capture(key, student, teacher)
            self._restore(snapshot, device)
            step = _GraphedStep(graphed, tuple(self.head.parameters()), detached,
                                path_of(self.head, graphed=True, like=student), description)
            if self.self_check:
                low_precision = key.autocast in LOW_PRECISION or student.dtype in LOW_PRECISION
                tolerance = max(self.tolerance, LOW_PRECISION_TOLERANCE) if low_precision else self.tolerance
                verdict = self._check(step, student, teacher, snapshot, tolerance)
                verdict["pool_bytes"] = self._runtime.pool_bytes(pool, device)
                self.self_checks[description] = verdict
                if not verdict["passed"]:
                    raise GraphingFailed(f"the self-check failed for {description}: {verdict['reason']}")
        except Exception as exc:  # this key runs eagerly; _fall_back says why
            self._restore(snapshot, device)
            return str(exc) if isinstance(exc, GraphingFailed) else \
                f"capturing {description} raised {type(exc).__name__}: {exc}"
        return step

    def _capture(self, key: GraphKey, student: torch.Tensor, teacher: torch.Tensor) -> tuple:
        """(the graphed callable of (student, teacher, *parameters), the output keys that do not require grad,
        its memory pool)."""
        head = self.head
        names = [name for name, _ in head.named_parameters()]
        # Fresh leaves everywhere: aliases of the parameters (same storage) and copies of the features.
        aliases = [p.detach().requires_grad_(p.requires_grad) for p in head.parameters()]
        sample = (student.detach().clone().requires_grad_(student.requires_grad),
                  teacher.detach().clone().requires_grad_(teacher.requires_grad), *aliases)

        def step(student_feat, teacher_feat, *weights):
            outputs = torch.func.functional_call(head, dict(zip(names, weights)), (student_feat, teacher_feat))
            if not isinstance(outputs, dict):
                raise GraphingFailed(f"the head returned a {type(outputs).__name__}; CUDAGraphHead needs a dict of "
                                     "tensors")
            not_tensors = [k for k, v in outputs.items() if not isinstance(v, torch.Tensor)]
            if not_tensors:
                raise GraphingFailed(f"the head returned non-tensor values ({', '.join(not_tensors)}); a CUDA graph "
                                     "can only return tensors (return diagnostics as 0-d tensors)")
            detached.clear()
            detached.update(k for k, v in outputs.items() if not v.requires_grad)
            return outputs

        detached: set[str] = set()
        with contextlib.ExitStack() as stack:
            stack.enter_context(kernels.auto_uses_triton())
            if key.autocast is not None:
                stack.enter_context(torch.autocast(student.device.type, dtype=key.autocast, cache_enabled=False))
            graphed, pool = self._runtime.capture(step, sample, self.warmup_iterations, student.device)
        return graphed, frozenset(detached), pool

    def _check(self, step: _GraphedStep, student: torch.Tensor, teacher: torch.Tensor, snapshot: tuple,
               tolerance: float) -> dict:
        """One graphed and one eager step from the same state and random numbers; restores that state."""
        device = student.device
        graphed = record_step(step.replay, self.head, student, teacher)
        self._restore(snapshot, device)
        with kernels.auto_uses_triton():
            eager = record_step(self.head, self.head, student, teacher)
        self._restore(snapshot, device)
        return compare_steps(graphed, eager, tolerance)
