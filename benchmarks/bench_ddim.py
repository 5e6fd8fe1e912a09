"""The 5-step DiffKD denoising chain (DDIM steps *and* the denoiser Φ), and the fused DDIM step alone.

Chain providers (same weights, same input; each one's output — and input gradient — is checked against our eager
reference before it is timed):
  diffusers     the paper's code: diffusers' DDIMScheduler (clip_sample=False) stepped in a Python loop,
                set_timesteps(2·NFE), lower half, use_clipped_model_output=True, with a plain nn.Conv2d Φ
  eager         our reference, DiffKDHead(backend="torch").denoise
  compile       the same under torch.compile (default mode, no autotune)
  triton        DiffKDHead(backend="triton").denoise (CUDA)
  triton-graph  the Triton chain captured in a CUDA graph (forward: torch.cuda.graph; forward+backward:
                torch.cuda.make_graphed_callables)
Modes: fwd (no_grad) and fwdbwd (forward, then backward of a fixed upstream gradient).

The step kernel (kernels.ddim_step / ddim_step_embed, forward and backward) is also timed alone on a size sweep,
reported as GB/s and as a fraction of the copy bandwidth measured in the same run, plus µs per step at the real
feature shapes.

    python benchmarks/bench_ddim.py --quick           # tiny shapes, under 30 s on a 2-core CPU (no torch.compile)
    python benchmarks/bench_ddim.py                   # CPU: a reduced matrix, fp32, no torch.compile: ~2 min
                                                      #   (it prints what it left out and the flag that adds it)
    python benchmarks/bench_ddim.py --compile         # CPU: adds torch.compile on one shape (minutes to compile)
    python benchmarks/bench_ddim.py --full --dtypes fp32,bf16 --json benchmarks/results/   # the whole matrix
    python benchmarks/bench_ddim.py --shapes feature-1024-7-32,logit-1000-256 --providers eager,triton
Shape syntax: feature-C-SIDE-B (a C×SIDE×SIDE map, batch B) or logit-K-B.  On a CPU it times with one thread and
the process's CPU time (--threads 1 --clock cpu), which stays consistent on a shared machine; --threads/--clock
override.  Rows are printed as they are measured; a section with a single provider on this device says so instead
of timing it.
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels  # noqa: E402
from benchmarks import _cli  # noqa: E402
from benchmarks._report import LivePrinter, Results, add_row, make_table  # noqa: E402
from benchmarks._timing import TimingPlan, is_gpu, time_candidates, time_left  # noqa: E402
from benchmarks.naive_head import NaiveDiffusionModel, PaperScheduler, diffusers_available, naive_denoise  # noqa: E402
from diffkd import DiffKDHead  # noqa: E402
from diffkd.graphs import relative_error  # noqa: E402
from kernels import reference  # noqa: E402
from kernels._common import interpreter_enabled  # noqa: E402

PROVIDERS = ("diffusers", "eager", "compile", "triton", "triton-graph")
BASELINES = ("diffusers", "eager", "compile")
MODES = ("fwd", "fwdbwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FULL_SHAPES = tuple(f"feature-{c}-{side}-{b}" for c in (256, 1024) for side in (7, 8) for b in (32, 64, 256)) + \
    tuple(f"logit-{k}-{b}" for k in (100, 1000) for b in (32, 64, 256))
CPU_SHAPES = ("feature-256-8-64", "feature-1024-7-32", "logit-100-64", "logit-1000-64")
QUICK_SHAPES = ("feature-16-4-4", "logit-10-4")
NFE = 5
# Relative-error bound (output and input gradient) for a provider against the eager reference: fp32 on the CPU
# differs by rounding only, grown through 5 unrolled steps of train-mode BatchNorm (see bench_head); on a GPU
# cuDNN and the Triton GEMMs use TF32 for fp32; bf16 rounds every op.
TOLERANCE = {("cpu", "fp32"): 2e-3, ("cuda", "fp32"): 2e-2, ("cpu", "bf16"): 5e-2, ("cuda", "bf16"): 5e-2}
SWEEP_MB = (1, 4, 16, 64, 256)
GPU_SWEEP_MB = SWEEP_MB + (1024,)
QUICK_SWEEP_MB = (1, 4)
SWEEP_CHANNELS, SWEEP_SIDE = 1024, 8
REAL_STEP_SHAPES = tuple((b, c, side) for c in (256, 1024) for side in (7, 8) for b in (32, 64, 256))
STEP_A, STEP_B = 1.42670, -0.50274  # the first step of the NFE-5 chain; any floats would do


@dataclass(frozen=True)
class ChainShape:
    name: str
    kind: str  # "feature" (spatial Φ) or "logit" (vector Φ)
    channels: int
    side: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> ChainShape:
        parts = text.split("-")
        try:
            if parts[0] == "feature" and len(parts) == 4:
                return cls(text, "feature", int(parts[1]), int(parts[2]), int(parts[3]))
            if parts[0] == "logit" and len(parts) == 3:
                return cls(text, "logit", int(parts[1]), 1, int(parts[2]))
        except ValueError:
            pass
        raise ValueError(f"bad shape {text!r}: expected feature-C-SIDE-B (e.g. feature-1024-7-32) or logit-K-B "
                         "(e.g. logit-1000-64)")

    def head(self, backend: str) -> DiffKDHead:
        kernel_size = 3 if self.kind == "feature" else 1
        return DiffKDHead(self.channels, self.channels, kernel_size=kernel_size, inference_steps=NFE, backend=backend)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.side, self.side)


class _Chain(torch.nn.Module):
    """head.denoise as a module (what make_graphed_callables captures)."""

    def __init__(self, head: DiffKDHead):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.denoise(x)


def provider_availability(device) -> dict[str, str | None]:
    gpu = is_gpu(device)
    return {
        "diffusers": None if diffusers_available() else "diffusers is not installed (pip install diffusers)",
        "eager": None,
        "compile": None,
        "triton": None if gpu or interpreter_enabled() else
        "the Triton backend needs a CUDA GPU (TRITON_INTERPRET=1 runs it in the interpreter, for dry runs only)",
        "triton-graph": None if gpu else "CUDA graphs need a CUDA GPU",
    }


def _capture_forward(chain, x: torch.Tensor):
    """A CUDA graph of ``chain(x)`` under no_grad; returns (replay function, static output)."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream), torch.no_grad():
        for _ in range(2):
            chain(x)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = chain(x)
    return graph.replay, static_out


class _ChainCase:
    """One (shape, dtype): the heads, the inputs, and a runnable per (provider, mode)."""

    def __init__(self, shape: ChainShape, dtype: torch.dtype, device):
        torch.manual_seed(0)
        self.shape, self.dtype, self.device = shape, dtype, device
        self.reference = shape.head("torch").to(device=device, dtype=dtype)
        x = torch.randn(shape.input_shape, device=device, dtype=dtype)
        # Our chain gets its input in the memory format our head computes in (channels-last maps by default);
        # the paper's code gets the plain contiguous tensor it would see.  Same values either way.
        ours_format = torch.channels_last if self.reference.channels_last else torch.contiguous_format
        self.inputs = {"paper": x.clone().requires_grad_(True),
                       "ours": x.contiguous(memory_format=ours_format).requires_grad_(True)}
        self.grad_out = torch.randn(shape.input_shape, device=device, dtype=dtype)

    def _triton_head(self) -> DiffKDHead:
        head = self.shape.head("triton").to(device=self.device, dtype=self.dtype)
        head.load_state_dict(self.reference.state_dict())
        return head

    def chain_function(self, provider: str):
        """(callable x → output, module owning the parameters)."""
        if provider == "diffusers":
            model = NaiveDiffusionModel(self.shape.channels, 3 if self.shape.kind == "feature" else 1)
            model.to(device=self.device, dtype=self.dtype).load_state_dict(self.reference.model.state_dict())
            scheduler = PaperScheduler(use_diffusers=True)
            return (lambda x: naive_denoise(model, scheduler, x, NFE)), model
        if provider == "eager":
            return self.reference.denoise, self.reference
        if provider == "compile":
            torch._dynamo.reset()  # fresh caches per case: no recompile limit, no automatic dynamic shapes
            return torch.compile(self.reference.denoise, dynamic=False), self.reference
        head = self._triton_head()
        return head.denoise, head

    def runnable(self, provider: str, mode: str):
        """(run: no-argument callable doing one timed iteration, result: callable → (output, input grad))."""
        x = self.inputs["paper" if provider == "diffusers" else "ours"]
        if provider == "triton-graph":
            head = self._triton_head()
            if mode == "fwd":
                static_x = x.detach().clone()
                replay, static_out = _capture_forward(head.denoise, static_x)

                def replayed():
                    replay()
                    return static_out, None
                return replay, replayed
            # Fresh leaf: an input whose AccumulateGrad node an earlier eager run created on the default stream
            # invalidates the capture of the backward.  The chain uses Φ only: the head's other parameters get no
            # gradient from it.
            x = x.detach().clone().requires_grad_(True)
            graphed = torch.cuda.make_graphed_callables(_Chain(head), (x,), allow_unused_input=True)
            return self._fwdbwd(graphed, head, x)
        chain, owner = self.chain_function(provider)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return chain(x)
            return run, lambda: (run(), None)
        return self._fwdbwd(chain, owner, x)

    def _fwdbwd(self, chain, owner, x):
        grad_out = self.grad_out
        state = {}

        def run():
            owner.zero_grad(set_to_none=True)
            x.grad = None
            out = chain(x)
            out.backward(grad_out)
            state["out"] = out

        def result():
            run()
            return state["out"].detach(), x.grad.detach().clone()
        return run, result


def _check(provider: str, mode: str, result, expected, tolerance: float) -> float:
    out, grad = result()
    error = relative_error(out, expected[0])
    if mode == "fwdbwd":
        error = max(error, relative_error(grad, expected[1]))
    if not error <= tolerance:
        raise AssertionError(f"{provider} {mode} differs from the eager reference: relative error {error:.3g} > "
                             f"{tolerance:g}")
    return error


def bench_chain_case(results: Results, section: dict, shape: ChainShape, dtype_name: str, device, *, providers,
                     modes, plan: TimingPlan, deadline: float | None, compile_reserve_s: float = 0,
                     live: LivePrinter | None = None) -> None:
    """Checks and times ``providers`` (all available here) at one (shape, dtype); ``compile`` is skipped when less
    than ``compile_reserve_s`` seconds are left before the deadline (its compilation alone can take that long)."""
    dtype = DTYPES[dtype_name]
    case = _ChainCase(shape, dtype, device)
    tolerance = TOLERANCE[(torch.device(device).type, dtype_name)]
    for mode in modes:
        label = f"{shape.name} {dtype_name} {mode}"
        _, eager_result = case.runnable("eager", mode)
        expected = eager_result()
        runs, errors = {}, {}
        for provider in providers:
            if time_left(deadline) <= (compile_reserve_s if provider == "compile" else 0):
                Results.skip(section, f"{label} / {provider}", "too close to the deadline")
                continue
            if provider == "compile" and live is not None:
                live.line(f"(compiling the chain for {label} with torch.compile: minutes on a CPU ...)")
            try:
                run, result = case.runnable(provider, mode)
                errors[provider] = _check(provider, mode, result, expected, tolerance)
                runs[provider] = run
            except Exception as exc:  # a failing provider is recorded; the others still run
                Results.error(section, f"{label} / {provider}", exc)
        if not runs or time_left(deadline) <= 0:
            continue
        try:
            timings = time_candidates(runs, device, plan, deadline)
        except Exception as exc:
            Results.error(section, f"{label}: timing", exc)
            continue
        baselines = [b for b in BASELINES if b in providers]  # no column for a baseline that does not run
        table = _chain_table(section, shape, dtype_name, mode, baselines)
        for provider, timing in timings.items():
            ratios = [timings[b].median_ms / timing.median_ms if b in timings else None for b in baselines]
            add_row(table, [shape.name, provider, shape.batch / timing.median_ms * 1e3, timing.median_ms, *ratios,
                            errors[provider]])
            if live is not None:
                live.row(table)
            section["records"].append({"shape": shape.name, "dtype": dtype_name, "mode": mode, "provider": provider,
                                       "batch": shape.batch, **timing.as_dict(), "rel_error": errors[provider],
                                       **{f"speedup_vs_{b}": r for b, r in zip(baselines, ratios)}})
        results.flush()


def _section_table(section: dict, title: str, columns: list[str]) -> dict:
    """The section's table titled ``title``, created on first use (so a cut-off run leaves no empty table)."""
    for table in section["tables"]:
        if table["title"] == title:
            return table
    table = make_table(title, columns, [])
    section["tables"].append(table)
    return table


def _chain_table(section: dict, shape: ChainShape, dtype_name: str, mode: str, baselines: list[str]) -> dict:
    """The table of one (dtype, mode, kind)."""
    what = "feature head (spatial Φ)" if shape.kind == "feature" else "logit head (vector Φ)"
    title = f"5-step chain with Φ, {what}, {dtype_name}, {'forward' if mode == 'fwd' else 'forward+backward'}"
    return _section_table(section, title, ["shape", "provider", "samples/s", "ms",
                                           *[f"× vs {b}" for b in baselines], "rel err vs eager"])


def _available_providers(section: dict, requested, availability: dict[str, str | None]) -> list[str]:
    """The requested providers that run here; the others are recorded as skipped, once each."""
    for provider in requested:
        if availability[provider] is not None:
            Results.skip(section, provider, availability[provider])
    return [p for p in requested if availability[p] is None]


def _single_provider(section: dict, what: str, provider: str) -> None:
    """Records (and prints) that a section has nothing to compare on this device; nothing is timed."""
    section["notes"].append(f"only {provider} runs on this device, so {what} has nothing to compare and was not "
                            "timed (see the skipped providers below)")
    section["single_provider"] = provider
    section["status"] = "done"


def run_chain_benchmark(results: Results, device, *, shapes, dtypes=("fp32",), modes=MODES, providers=PROVIDERS,
                        plan: TimingPlan = TimingPlan(), deadline: float | None = None, compile_reserve_s: float = 0,
                        section_name: str = "chain", left_out: Mapping[str, str] | None = None,
                        compile_shapes: int | None = None, live: bool = False) -> dict:
    """The chain section; ``left_out`` maps providers left out on purpose to why; ``compile_shapes`` limits
    torch.compile to the first shapes (None: all); ``live`` prints the section while it is measured (rows as they
    come)."""
    section = results.section(section_name)
    printer = LivePrinter(section_name, section, enabled=live)
    for provider, why in (left_out or {}).items():
        Results.skip(section, provider, why)
    section["notes"] += [f"NFE {NFE}: timesteps 400, 300, 200, 100, 0; BatchNorm in training mode",
                         "bf16: parameters and inputs in bfloat16 (no autocast)",
                         "× vs X: X's time / this provider's time (higher is faster)"]
    providers = _available_providers(section, providers, provider_availability(device))
    if len(providers) == 1:
        _single_provider(section, "the chain", providers[0])
        printer.start()
        printer.end()
        results.flush()
        return section
    if "diffusers" in providers:
        section["notes"].append(f"diffusers provider: {PaperScheduler(use_diffusers=True).source}")
    if not is_gpu(device) and interpreter_enabled() and "triton" in providers:
        section["notes"].append("triton ran in Triton's CPU interpreter: its times are not performance numbers")
    printer.start()
    for shape_text, dtype_name in itertools.product(shapes, dtypes):
        shape = ChainShape.parse(shape_text)
        if time_left(deadline) <= 0:
            Results.skip(section, f"{shape.name} {dtype_name}", "deadline reached")
            continue
        compiled_here = compile_shapes is None or shape_text in shapes[:compile_shapes]
        if "compile" in providers and not compiled_here:
            Results.skip(section, f"{shape.name} {dtype_name} / compile", f"torch.compile runs on the first "
                         f"{compile_shapes} shape(s) only here (minutes of compiling per shape)")
        case_providers = [p for p in providers if compiled_here or p != "compile"]
        try:
            bench_chain_case(results, section, shape, dtype_name, device, providers=case_providers, modes=modes,
                             plan=plan, deadline=deadline, compile_reserve_s=compile_reserve_s, live=printer)
        except Exception as exc:  # e.g. out of memory at one shape: the next shape still runs
            Results.error(section, f"{shape.name} {dtype_name}", exc)
        results.flush()
    section["status"] = "done"
    printer.end()
    results.flush()
    return section


# ---- the step kernel alone ----------------------------------------------------------------------------------
def _step_ops(provider: str):
    """{op name: (function of (x, eps, emb, g), tensors moved per call)} for one provider."""
    if provider == "torch":
        return {
            "step fwd": (lambda x, eps, emb, g: reference.ddim_step(x, eps, STEP_A, STEP_B), 3),
            "step+embed fwd": (lambda x, eps, emb, g: reference.ddim_step_embed(x, eps, STEP_A, STEP_B, emb), 4),
            # What autograd runs for the reference's backward: dx = a·g, dε̂ = b·g.
            "step bwd": (lambda x, eps, emb, g: (g * STEP_A, g * STEP_B), 3),
        }
    ops = {
        "step fwd": (lambda x, eps, emb, g: kernels.ddim_step(x, eps, STEP_A, STEP_B, backend="triton"), 3),
        "step+embed fwd": (lambda x, eps, emb, g: kernels.ddim_step_embed(x, eps, STEP_A, STEP_B, emb,
                                                                          backend="triton"), 4),
    }
    backward = getattr(torch.ops.diffkd, "ddim_step_backward", None)
    if backward is not None:
        ops["step bwd"] = (lambda x, eps, emb, g: backward(g, STEP_A, STEP_B), 3)
    return ops


def _step_tensors(shape, dtype, device):
    batch, channels, side = shape
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
    return x, torch.randn_like(x), torch.randn(channels, device=device, dtype=dtype), torch.randn_like(x)


def _time_step_ops(shape, dtype, provider: str, device, plan: TimingPlan, deadline):
    """Times every step op of ``provider`` on fresh tensors of ``shape``: (elements per tensor, ops, timings)."""
    tensors = _step_tensors(shape, dtype, device)
    ops = _step_ops(provider)
    timings = time_candidates({op: (lambda f=f: f(*tensors)) for op, (f, _) in ops.items()}, device, plan, deadline)
    return tensors[0].numel(), ops, timings


def copy_bandwidth(megabytes: int, device, *, plan: TimingPlan, deadline=None) -> float:
    """GB/s of ``dst.copy_(src)`` on a tensor of ``megabytes`` (read + write counted)."""
    src = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_candidates({"copy": lambda: dst.copy_(src)}, device, plan, deadline)["copy"]
    return 2 * src.numel() / (timing.median_ms * 1e-3) / 1e9


def step_kernel_availability(device) -> dict[str, str | None]:
    return {"torch": None, "triton": None if is_gpu(device) or interpreter_enabled() else
            "the Triton kernel needs a CUDA GPU (TRITON_INTERPRET=1 runs it in the interpreter, for dry runs only)"}


def run_step_kernel_benchmark(results: Results, device, *, sizes_mb=SWEEP_MB, real_shapes=REAL_STEP_SHAPES,
                              dtypes=("fp32",), plan: TimingPlan = TimingPlan(), deadline: float | None = None,
                              section_name: str = "step_kernel", live: bool = False) -> dict:
    """The step-kernel section; ``live`` prints it while it is measured (rows as they come)."""
    section = results.section(section_name)
    printer = LivePrinter(section_name, section, enabled=live)
    providers = _available_providers(section, ("torch", "triton"), step_kernel_availability(device))
    if len(providers) == 1:
        _single_provider(section, "the DDIM step kernel", providers[0])
        printer.start()
        printer.end()
        results.flush()
        return section
    if not is_gpu(device):
        section["notes"].append("triton ran in Triton's CPU interpreter: its numbers are not performance numbers")
    section["notes"].append(f"sweep tensors: B×{SWEEP_CHANNELS}×{SWEEP_SIDE}×{SWEEP_SIDE} fp32, B set by the size; "
                            "GB/s counts every tensor read or written once (fwd: x, ε̂, out [+ next input]; "
                            "bwd: g, dx, dε̂); sizes that fit in the caches can beat the copy bandwidth, which is "
                            "measured on the largest size")
    try:
        copy_gbs = copy_bandwidth(max(sizes_mb), device, plan=plan, deadline=deadline)
    except Exception as exc:
        Results.error(section, "copy bandwidth", exc)
        copy_gbs = None
    section["copy_bandwidth_gbs"] = copy_gbs
    section["notes"].append(f"copy bandwidth (torch copy_ of {max(sizes_mb)} MB, read+write): "
                            f"{copy_gbs:.1f} GB/s" if copy_gbs else "copy bandwidth: not measured")
    printer.start()
    results.flush()

    for megabytes, provider in itertools.product(sizes_mb, providers):
        if time_left(deadline) <= 0:
            Results.skip(section, f"sweep {megabytes} MB / {provider}", "deadline reached")
            continue
        batch = max(1, megabytes * 2 ** 20 // (SWEEP_CHANNELS * SWEEP_SIDE * SWEEP_SIDE * 4))
        try:
            elements, ops, timings = _time_step_ops((batch, SWEEP_CHANNELS, SWEEP_SIDE), torch.float32, provider,
                                                    device, plan, deadline)
        except Exception as exc:
            Results.error(section, f"sweep {megabytes} MB / {provider}", exc)
            continue
        table = _section_table(section, "DDIM step kernel alone: size sweep (fp32)",
                               ["size / tensor", "provider", "op", "µs", "GB/s", "of copy BW"])
        for op, timing in timings.items():
            gbs = ops[op][1] * elements * 4 / (timing.median_ms * 1e-3) / 1e9
            fraction = gbs / copy_gbs if copy_gbs else None
            add_row(table, [f"{megabytes} MB", provider, op, timing.median_ms * 1e3, gbs, fraction])
            printer.row(table)
            section["records"].append({"sweep_mb": megabytes, "provider": provider, "op": op, **timing.as_dict(),
                                       "gbs": gbs, "fraction_of_copy": fraction})
        results.flush()

    for (batch, channels, side), dtype_name, provider in itertools.product(real_shapes, dtypes, providers):
        if time_left(deadline) <= 0:
            Results.skip(section, f"real shape B{batch} C{channels} {side}×{side}", "deadline reached")
            continue
        try:
            _, _, timings = _time_step_ops((batch, channels, side), DTYPES[dtype_name], provider, device, plan,
                                           deadline)
        except Exception as exc:
            Results.error(section, f"real shape B{batch} C{channels} {side}×{side} {dtype_name} / {provider}", exc)
            continue
        table = _section_table(section, "DDIM step at the real shapes: µs per call",
                               ["shape", "dtype", "provider", "step fwd", "step+embed fwd", "step bwd"])
        add_row(table, [f"B{batch} C{channels} {side}×{side}", dtype_name, provider,
                        *[timings[op].median_ms * 1e3 if op in timings else None
                          for op in ("step fwd", "step+embed fwd", "step bwd")]])
        printer.row(table)
        section["records"].append({"batch": batch, "channels": channels, "side": side, "dtype": dtype_name,
                                   "provider": provider,
                                   **{f"{op} us": t.median_ms * 1e3 for op, t in timings.items()}})
        results.flush()
    section["status"] = "done"
    printer.end()
    results.flush()
    return section


def main(argv=None) -> int:
    parser = _cli.script_parser(__doc__, robust_cpu_defaults=True)
    matrix = parser.add_mutually_exclusive_group()
    matrix.add_argument("--quick", action="store_true",
                        help=f"tiny shapes ({', '.join(QUICK_SHAPES)}), small sweep, no torch.compile: seconds")
    matrix.add_argument("--full", action="store_true", help="the whole shape matrix (default on a GPU)")
    matrix.add_argument("--shapes", default=None, help="comma-separated shapes, e.g. feature-1024-7-32,logit-100-64")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (default fp32)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: fwd, fwdbwd")
    parser.add_argument("--providers", default=None,
                        help=f"from: {', '.join(PROVIDERS)} (default: all on a GPU; on a CPU and with --quick "
                             f"all but compile)")
    parser.add_argument("--compile", action="store_true",
                        help="on a CPU or with --quick: also time torch.compile, on the first shape only (compiling "
                             "takes minutes per shape on a CPU); a GPU run without --quick times it on every shape")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds on the CPU (default 5: the no-flag CPU run stays near 2 min)")
    parser.add_argument("--sweep-mb", default=None,
                        help="comma-separated sizes in MB per tensor for the step-kernel sweep "
                             f"(default {','.join(map(str, SWEEP_MB))} on a CPU, up to 1024 on a GPU)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the step-kernel section")
    parser.add_argument("--no-chain", action="store_true", help="skip the chain section")
    args = parser.parse_args(argv)
    gpu = is_gpu(_cli.resolve_device(args.device))
    if args.quick:
        shapes = QUICK_SHAPES
    elif args.shapes:
        shapes = tuple(s for s in args.shapes.split(",") if s)
    else:
        shapes = FULL_SHAPES if args.full or gpu else CPU_SHAPES
    left_out = {}
    try:
        [ChainShape.parse(s) for s in shapes]
        dtypes = _choices(args.dtypes, DTYPES, "--dtypes")
        modes = _choices(args.modes, MODES, "--modes")
        compile_shapes = None
        if args.providers is not None:
            providers = _choices(args.providers, PROVIDERS, "--providers")
        elif gpu and not args.quick:
            providers = PROVIDERS
        elif args.compile:
            providers, compile_shapes = PROVIDERS, 1
        else:
            providers = tuple(p for p in PROVIDERS if p != "compile")
            left_out["compile"] = (f"left out {'of --quick' if args.quick else 'on a CPU'}, where torch.compile takes "
                                   f"minutes per shape: add --compile to time it on {shapes[0]}")
        sizes = tuple(int(v) for v in args.sweep_mb.split(",")) if args.sweep_mb else (
            QUICK_SWEEP_MB if args.quick else GPU_SWEEP_MB if gpu else SWEEP_MB)
    except ValueError as exc:
        parser.error(str(exc))
    device, results = _cli.prepare(args)
    plan = TimingPlan(repeats=args.repeats, clock=args.clock)
    failed = False
    if not args.no_chain:
        section = run_chain_benchmark(results, device, shapes=shapes, dtypes=dtypes, modes=modes,
                                      providers=providers, plan=plan, left_out=left_out,
                                      compile_shapes=compile_shapes, live=True)
        failed |= bool(section["errors"])
    if not args.no_sweep:
        real_shapes = ((4, 16, 4),) if args.quick else REAL_STEP_SHAPES
        section = run_step_kernel_benchmark(results, device, sizes_mb=sizes, real_shapes=real_shapes, dtypes=dtypes,
                                            plan=plan, live=True)
        failed |= bool(section["errors"])
    _print_left_out(args, shapes, dtypes, left_out, gpu)
    if results.path is not None:
        print(f"\nresults: {results.path} and {results.path.with_suffix('.md')}")
    return 1 if failed else 0


def _print_left_out(args, shapes, dtypes, left_out: Mapping[str, str], gpu: bool) -> None:
    """What this run did not measure, and the flag that adds it."""
    lines = [f"torch.compile: {why}" for provider, why in left_out.items() if provider == "compile"]
    if not (args.full or args.shapes or gpu):
        lines.append(f"{len(FULL_SHAPES) - len(shapes)} of the {len(FULL_SHAPES)} shapes of the full matrix: add "
                     f"--full (or --shapes ...)")
    if "bf16" not in dtypes:
        lines.append("bfloat16: add --dtypes fp32,bf16")
    if args.no_chain or args.no_sweep:
        lines.append(f"the {'chain' if args.no_chain else 'step-kernel'} section: drop --no-"
                     f"{'chain' if args.no_chain else 'sweep'}")
    if lines:
        print("\nleft out of this run:\n" + "\n".join(f"- {line}" for line in lines), flush=True)


def _choices(text: str, known, flag: str) -> tuple[str, ...]:
    values = tuple(v for v in text.split(",") if v)
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise ValueError(f"{flag}: unknown or empty {', '.join(unknown) or text!r}; choose from {', '.join(known)}")
    return values


if __name__ == "__main__":
    sys.exit(main())
