"""CUDAGraphHead: a DiffKD head whose forward and backward replay CUDA graphs, where the Triton kernels pay off.

On an H200 the CIFAR feature head's forward+backward took 18.8 ms with PyTorch's ops, 59.3 ms with the Triton
kernels launched eagerly (each launch cost about 100 µs of host time) and 3.92 ms with the Triton kernels replayed
from a CUDA graph (benchmarks/results/nvidia-h200-2026-11-26-rerun.md).  Wrap a head and use it as before::

    head = CUDAGraphHead(DiffKDHead(256, 256))        # same call, same dict, same state_dict keys
    out = head(student_feat, teacher_feat)            # captured on the first training call per shape, then replayed
    (ce + out["loss"]).backward()                     # gradients reach student_feat and every head parameter
    print(head.path)                                  # "graphed Triton", or "eager torch" on a CPU

When it graphs.  A call is captured and replayed when the head is in training mode, gradients are enabled, both
features are CUDA tensors and no ``generator`` or explicit noise is passed.  Everything else runs the bare head
eagerly, with identical results: CPU tensors, eval mode, ``torch.no_grad()`` (validation gains nothing from a graph
that must also hold the backward), and calls with a ``generator`` or explicit ``blend_noise`` / ``diffusion_noise``
/ ``diffusion_t`` (a graph can draw only from the device's default generator, and reproducing given noises is the
eager reference's job).  One graph pair (forward and backward) is captured per *key*: the shape, strides (memory
format), dtype, device and ``requires_grad`` of both features, the autocast state and dtype, and the TF32 flags.

How.  ``torch.cuda.make_graphed_callables`` captures the head's forward and backward after warm-up iterations on a
side stream and returns an autograd function that copies the inputs into static buffers and replays; its
machinery (a shared memory pool for both graphs, static gradient buffers, the autograd node that hands the
parameter gradients back) is PyTorch's tested code, so this module does not hand-write it.  Two things are added:
- the head's parameters enter the capture as fresh leaf *aliases* (same storage, ``torch.func.functional_call``),
  and the real parameters are passed at replay.  Autograd nodes that already exist for the real parameters (DDP
  creates and keeps them when it wraps the model, on the default stream) then never take part in a capture, and
  the gradients still reach the real parameters through their own accumulation, with DDP's hooks.
- warm-up and capture run inside ``kernels.auto_uses_triton()``, so backend "auto" compiles and autotunes the
  Triton kernels before capture (inside a capture "auto" picks them anyway), and under autocast inside an
  autocast region with ``cache_enabled=False``, as make_graphed_callables requires.
Noise stays fresh: the kernels' seeds are drawn with ``torch.randint`` on the device's default generator, whose
Philox offset advances on every replay (the torch backend's ``torch.randn`` likewise).  BatchNorm running
statistics and ``num_batches_tracked`` are in-place updates of the head's own buffers, captured and replayed.
Warm-up and self-check steps leave no trace: the random state and every buffer are restored after them, so a
graphed call leaves the head in the state of exactly one step.

Self-check.  On the first call of each new key, one graphed forward+backward is compared with one eager step of the
same head, with the same kernels (``kernels.auto_uses_triton()``) and the same random state: every output, the
student feature's gradient, the parameter gradients (as one vector) and every buffer must agree within
``SELF_CHECK_TOLERANCE`` relative error (``num_batches_tracked`` exactly).  Both steps compute gradients with
``torch.autograd.grad``, so ``.grad`` is untouched.  Then the call itself is replayed.  If capture raises or the
check disagrees, the module runs eagerly from then on and says why once (``warnings.warn``, ``fallback_reason``):
graphing never silently changes training.

Contract.
- Outputs: the loss terms and every other output with at most one dimension (``gamma``, scalar diagnostics) are
  copies the caller may keep.  Maps (``denoised``, ``target``) are the graph's static buffers: valid until the next
  call of the same key, like make_graphed_callables' outputs.
- One backward per call, before the next call: a replay reuses the memory of the previous replay's activations.
  A call made while the previous call's outputs can still be backpropagated runs eagerly instead (with one warning),
  so gradient accumulation (forward, backward, forward, backward, ..., step) replays every micro-batch, and an
  unusual order stays correct.
- Gradients accumulate into ``.grad`` exactly as eager autograd does (micro-batch accumulation works).
- Parameters and buffers must keep their storage (optimizers and ``load_state_dict`` update in place);
  ``.to()``, ``.half()`` and other conversions drop the graphs, which are captured again on the next call.
- DDP: wrap each head in CUDAGraphHead before wrapping the model in DistributedDataParallel.
- ``state_dict()`` and ``load_state_dict()`` use the bare head's keys, so checkpoints and
  ``diffkd.load_official_state_dict`` do not see the wrapper; ``parameters()`` are the head's own.
- ``check_finite=True`` heads read the features on the host every call, which a graph cannot capture: they run
  eagerly (with the warning).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels
from kernels._common import AUTO_TRITON_IN_GRAPHS, TRITON_DTYPES, triton_importable, validate_backend_name

SELF_CHECK_TOLERANCE = 1e-3  # relative error; the same kernels differ only by reduction order (atomics, TF32)
WARMUP_ITERATIONS = 3        # make_graphed_callables' default
HEAD_PREFIX = "head."
EXPLICIT_RANDOMNESS = ("generator", "blend_noise", "diffusion_noise", "diffusion_t")
PATHS = ("eager torch", "eager Triton", "graphed torch", "graphed Triton")


class GraphingFailed(RuntimeError):
    """Capture or self-check did not succeed; the message says why."""


# ---- comparing a graphed step with an eager one ---------------------------------------------------------------
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


def _gradient_error(actual: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor | None]) -> float:
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


def _buffer_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
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
    errors["parameter grads"] = _gradient_error(graphed.param_grads, eager.param_grads)
    for name in sorted(set(graphed.buffers) | set(eager.buffers)):
        both = name in graphed.buffers and name in eager.buffers
        errors[f"buffer {name}"] = _buffer_error(graphed.buffers[name], eager.buffers[name]) if both else math.inf
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


# ---- which path a head runs -----------------------------------------------------------------------------------
def _backend_in_graph(head: nn.Module, dtype: torch.dtype) -> str:
    """The backend a capture of the head will use, by the kernels' rule for "auto" inside a capture (for a
    prediction without CUDA tensors; a capture itself asks ``kernels.resolve_backend``)."""
    requested = validate_backend_name(getattr(head, "backend", "torch"))
    uses_triton = requested != "torch" and triton_importable() and dtype in TRITON_DTYPES
    if not uses_triton:
        return "torch"
    if requested == "auto" and not all(AUTO_TRITON_IN_GRAPHS.values()):  # "auto" follows the per-op table
        return "Triton and torch" if any(AUTO_TRITON_IN_GRAPHS.values()) else "torch"
    return "Triton"


def _eager_path(head: nn.Module, like: torch.Tensor | None) -> str:
    """The path of an eager call of ``head`` on tensors like ``like`` (None: no tensor of that device can be made
    here; then the backend's name decides, "auto" being the PyTorch ops outside a capture)."""
    backend = getattr(head, "backend", "torch")
    if like is None:
        resolved = "triton" if validate_backend_name(backend) == "triton" else "torch"
    else:
        try:
            resolved = kernels.resolve_backend(backend, like)
        except ValueError:  # backend "triton" on a CPU without the interpreter: the head's call raises the same
            resolved = "triton"
    return "eager Triton" if resolved == "triton" else "eager torch"


def _parameter_device_and_dtype(head: nn.Module) -> tuple[torch.device, torch.dtype]:
    reference = next(head.parameters(), None)
    if reference is None:
        return torch.device("cpu"), torch.float32
    return reference.device, reference.dtype


def head_path(head: nn.Module, device: torch.device | str | None = None) -> str:
    """"eager torch", "eager Triton", "graphed torch", "graphed Triton" (or "graphed Triton and torch" when the
    per-op table of kernels._common sends some ops to PyTorch inside graphs): the path a training call of ``head`` on
    ``device`` (default: its parameters' device) runs.  For a CUDAGraphHead: the path its last call ran, or before
    any call the path it will try."""
    bare = head.head if isinstance(head, CUDAGraphHead) else head
    default_device, dtype = _parameter_device_and_dtype(bare)
    device = torch.device(device) if device is not None else default_device
    if isinstance(head, CUDAGraphHead):
        if head.last_path is not None:
            return head.last_path
        if device.type == "cuda" and head.fallback_reason is None and not getattr(bare, "check_finite", False):
            return f"graphed {_backend_in_graph(bare, dtype)}"
    usable = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    return _eager_path(bare, torch.empty(0, device=device, dtype=dtype) if usable else None)


# ---- the CUDA operations, behind one seam ---------------------------------------------------------------------
def kernels_as_captured(head: nn.Module):
    """A context in which eager calls of ``head`` run the kernels its CUDA graph replays: for backend "auto",
    ``kernels.auto_uses_triton()`` (which makes "auto" pick Triton for CUDA tensors as during capture)."""
    if validate_backend_name(getattr(head, "backend", "torch")) != "auto":
        return contextlib.nullcontext()
    uses_triton = getattr(kernels, "auto_uses_triton", None)
    if uses_triton is None:
        raise GraphingFailed("kernels.auto_uses_triton() is missing, so the Triton kernels cannot be compiled before "
                             "capture; update the kernels package, or build the head with backend='triton'")
    return uses_triton()


class CudaGraphRuntime:
    """What CUDAGraphHead needs from CUDA.  The tests substitute a CPU stand-in with the same methods."""

    @staticmethod
    def handles(*tensors: torch.Tensor) -> bool:
        return all(t.is_cuda for t in tensors)

    @staticmethod
    def rng_state(device: torch.device) -> torch.Tensor:
        return torch.cuda.get_rng_state(device)

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
        torch.cuda.set_rng_state(state, device)

    @staticmethod
    def kernels_as_captured(head: nn.Module):
        return kernels_as_captured(head)

    @staticmethod
    def capture(step: Callable, sample_args: tuple, warmup_iterations: int) -> Callable:
        return torch.cuda.make_graphed_callables(step, sample_args, num_warmup_iters=warmup_iterations,
                                                 allow_unused_input=True)


# ---- state-dict transparency ----------------------------------------------------------------------------------
def _strip_head_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``<prefix>head.X`` becomes ``<prefix>X``, in place and in order (metadata too)."""
    inner = prefix + HEAD_PREFIX
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        inner_name = inner[:-1]
        entries = list(metadata.items())
        metadata.clear()
        for key, value in entries:
            if key == inner_name:  # the head's own version replaces the wrapper's
                metadata[prefix[:-1]] = value
            elif key.startswith(inner):
                metadata[prefix + key[len(inner):]] = value
            elif key != prefix[:-1]:
                metadata[key] = value


def _add_head_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a bare head's keys ``<prefix>X`` are loaded as ``<prefix>head.X``."""
    inner = prefix + HEAD_PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


# ---- the wrapper ----------------------------------------------------------------------------------------------
class _GraphedStep:
    """One captured key: the graphed callable, the parameters it takes, the outputs eager returns detached, the
    path label, and the guard against replaying over activations that a pending backward still needs."""

    def __init__(self, graphed: Callable, params: tuple, detached: frozenset, path: str, description: str):
        self.graphed, self.params, self.detached = graphed, params, detached
        self.path, self.description = path, description
        self._pending_node = None  # weak reference to the autograd node of the last replay, until its backward ran

    def backward_pending(self) -> bool:
        return self._pending_node is not None and self._pending_node() is not None

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.graphed(student, teacher, *self.params)
        node = next((v.grad_fn for v in outputs.values() if v.grad_fn is not None), None)
        self._pending_node = None
        if node is not None:
            try:
                self._pending_node = weakref.ref(node)
            except TypeError:  # a built-in node (not a replay's): nothing of ours to protect
                pass
            else:
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


class CUDAGraphHead(nn.Module):
    """Wraps a DiffKD head (``head(student_feat, teacher_feat, ...) -> dict``) so that its training calls on CUDA
    replay CUDA graphs of its forward and backward; see the module's documentation for when, how and the contract.

    ``self_check`` (default True) compares the first replay of each key with an eager step; ``warmup_iterations``
    are the eager iterations before each capture.  ``last_path`` is the path of the last call ("eager torch",
    "eager Triton", "graphed torch", "graphed Triton"; None before the first), ``path`` the same or, before any call,
    the path the head will try; ``eager_reason`` why the last call ran eagerly (None when it replayed a graph);
    ``fallback_reason`` why graphing was given up for good (None while it is not);
    ``self_checks`` maps each captured key's description to its self-check verdict (:func:`compare_steps`).
    """

    def __init__(self, head: nn.Module, *, self_check: bool = True, warmup_iterations: int = WARMUP_ITERATIONS,
                 tolerance: float = SELF_CHECK_TOLERANCE):
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
        self.head = head
        self.self_check, self.warmup_iterations, self.tolerance = self_check, warmup_iterations, tolerance
        self.last_path: str | None = None
        self.eager_reason: str | None = None
        self.fallback_reason: str | None = None
        self.self_checks: dict[str, dict] = {}
        self._graphs: dict[tuple, _GraphedStep] = {}
        self._warned_pending = False
        self._runtime = CudaGraphRuntime()
        self.register_state_dict_post_hook(_strip_head_prefix)
        self.register_load_state_dict_pre_hook(_add_head_prefix)

    def extra_repr(self) -> str:
        return f"self_check={self.self_check}, graphs={len(self._graphs)}, path={self.last_path!r}"

    @property
    def path(self) -> str:
        return head_path(self)

    def _apply(self, fn, recurse=True):
        # Conversions (.to(), .half(), ...) may give parameters and buffers new storage: the graphs would replay
        # on the old one.  They are captured again on the next call.
        self._graphs.clear()
        return super()._apply(fn, recurse)

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
        return self.fallback_reason

    def _key(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple:
        device_type = student.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        return tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad) for t in (student, teacher)) \
            + (autocast, tf32)

    @staticmethod
    def _describe(key: tuple) -> str:
        (s_shape, _, s_dtype, device, s_grad), (t_shape, _, t_dtype, _, _), autocast, _ = key
        return (f"student {list(s_shape)} {str(s_dtype).replace('torch.', '')}"
                f"{' (requires grad)' if s_grad else ''}, teacher {list(t_shape)} "
                f"{str(t_dtype).replace('torch.', '')}, {device}"
                + (f", autocast {str(autocast).replace('torch.', '')}" if autocast is not None else ""))

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                generator: torch.Generator | None = None, blend_noise: torch.Tensor | None = None,
                diffusion_noise: torch.Tensor | None = None,
                diffusion_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        explicit = {name: value for name, value in zip(EXPLICIT_RANDOMNESS,
                                                      (generator, blend_noise, diffusion_noise, diffusion_t))
                    if value is not None}
        self.eager_reason = self._eager_reason(student_feat, teacher_feat, explicit)
        if self.eager_reason is not None:
            return self._eager(student_feat, teacher_feat, **explicit)
        key = self._key(student_feat, teacher_feat)
        step = self._graphs.get(key)
        if step is None:
            step = self._prepare(key, student_feat, teacher_feat)
            if step is None:  # fell back; the reason was given
                self.eager_reason = self.fallback_reason
                return self._eager(student_feat, teacher_feat)
        if step.backward_pending():
            self.eager_reason = "the previous call's backward has not run yet"
            if not self._warned_pending:
                self._warned_pending = True
                warnings.warn("CUDAGraphHead was called again before the backward of its previous call; that call "
                              "ran eagerly, because a replay would overwrite the activations the pending backward "
                              "needs (call backward once per forward, before the next forward)", RuntimeWarning,
                              stacklevel=2)
            return self._eager(student_feat, teacher_feat)
        self.last_path = step.path
        return step(student_feat, teacher_feat)

    def _eager(self, student_feat, teacher_feat, **explicit) -> dict[str, torch.Tensor]:
        if isinstance(student_feat, torch.Tensor):
            self.last_path = _eager_path(self.head, student_feat)
        return self.head(student_feat, teacher_feat, **explicit)

    # ---- capture and self-check -------------------------------------------------------------------------------
    def _snapshot(self, device: torch.device) -> tuple:
        return self._runtime.rng_state(device), [b.detach().clone() for b in self.head.buffers()]

    @torch.no_grad()
    def _restore(self, snapshot: tuple, device: torch.device) -> None:
        rng_state, buffers = snapshot
        for buffer, saved in zip(self.head.buffers(), buffers):
            buffer.copy_(saved)
        self._runtime.set_rng_state(rng_state, device)

    def _prepare(self, key: tuple, student: torch.Tensor, teacher: torch.Tensor) -> _GraphedStep | None:
        """Captures ``key`` and runs its self-check; on failure records the reason, warns once and returns None.
        The head's buffers and the random state are as before the call either way."""
        device = student.device
        snapshot = self._snapshot(device)
        description = self._describe(key)
        try:
            if getattr(self.head, "check_finite", False):
                raise GraphingFailed("the head has check_finite=True, which reads the features on the host on "
                                     "every call (a CUDA graph cannot capture that)")
            graphed, detached = self._capture(key, student, teacher)
            self._restore(snapshot, device)
            with self._runtime.kernels_as_captured(self.head):  # the kernels' own rule, as in the capture
                resolved = kernels.resolve_backend(getattr(self.head, "backend", "torch"), student)
            path = f"graphed {'Triton' if resolved == 'triton' else 'torch'}"
            step = _GraphedStep(graphed, tuple(self.head.parameters()), detached, path, description)
            if self.self_check:
                verdict = self._check(step, student, teacher, snapshot)
                self.self_checks[description] = verdict
                if not verdict["passed"]:
                    raise GraphingFailed(f"the self-check failed for {description}: {verdict['reason']}")
        except Exception as exc:  # any failure: eager from now on, said once
            self._restore(snapshot, device)
            self.fallback_reason = str(exc) if isinstance(exc, GraphingFailed) else \
                f"capturing {description} raised {type(exc).__name__}: {exc}"
            self._graphs.clear()
            warnings.warn(f"CUDAGraphHead runs this head eagerly from now on: {self.fallback_reason}", RuntimeWarning,
                          stacklevel=3)
            return None
        self._graphs[key] = step
        return step

    def _capture(self, key: tuple, student: torch.Tensor, teacher: torch.Tensor) -> tuple[Callable, frozenset]:
        """(the graphed callable of (student, teacher, *parameters), the output keys that do not require grad)."""
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
        autocast_dtype = key[2]
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._runtime.kernels_as_captured(head))
            if autocast_dtype is not None:
                stack.enter_context(torch.autocast(student.device.type, dtype=autocast_dtype, cache_enabled=False))
            graphed = self._runtime.capture(step, sample, self.warmup_iterations)
        return graphed, frozenset(detached)

    def _check(self, step: _GraphedStep, student: torch.Tensor, teacher: torch.Tensor, snapshot: tuple) -> dict:
        """One graphed and one eager step from the same state and random numbers; restores that state."""
        device = student.device
        graphed = record_step(lambda s, t: step.graphed(s, t, *step.params), self.head, student, teacher)
        self._restore(snapshot, device)
        with self._runtime.kernels_as_captured(self.head):
            eager = record_step(self.head, self.head, student, teacher)
        self._restore(snapshot, device)
        return compare_steps(graphed, eager, self.tolerance)
