"""Head-level benchmark: our DiffKD head against the head a user of the paper's code has (naive_head.py).

Forward+backward of the whole head (trans, noise adapter, blend, 5-step DDIM chain with Φ, proj, diffusion loss,
autoencoder, KD loss) at the CIFAR feature head (ResNet32x4 → ResNet8x4: B 64, C 256, 8×8), the CIFAR logit head
(K 100, B 64) and the ResNet-34 → ResNet-18 feature head with the 1024-channel autoencoder (B 32, 512 ch, 7×7).
Both heads share weights; before timing, their losses and gradients are checked equal with the same explicit
noises.  A torch.profiler split (convolutions, BatchNorm, the rest) says where the time goes.

    python benchmarks/bench_head.py                         # CPU: naive vs ours (torch backend)
    python benchmarks/bench_head.py --json benchmarks/results/   # also write <card>-<date>.json / .md
    python benchmarks/bench_head.py --shapes cifar-feature --no-profile
On a GPU the providers are naive (cuDNN + diffusers), ours with the torch backend, ours with the Triton backend
and ours with the Triton backend captured in a CUDA graph (torch.cuda.make_graphed_callables).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _cli  # noqa: E402
from benchmarks._report import Results, make_table, print_section  # noqa: E402
from benchmarks._timing import TimingPlan, is_gpu, time_candidates, time_left  # noqa: E402
from benchmarks.naive_head import (NaiveDiffKDHead, PaperScheduler, compare_heads, explicit_noises,  # noqa: E402
                                   worst_error)
from diffkd import DiffKDHead  # noqa: E402
from kernels._common import interpreter_enabled  # noqa: E402

# name: (head keyword arguments, batch, spatial side or None for a vector head, description)
HEAD_SHAPES = {
    "cifar-feature": (dict(student_channels=256, teacher_channels=256), 64, 8,
                      "CIFAR feature head (ResNet32x4→ResNet8x4), B 64, C 256, 8×8"),
    "cifar-logit": (dict(student_channels=100, teacher_channels=100, kernel_size=1, distance="kl"), 64, None,
                    "CIFAR logit head, K 100, B 64"),
    "imagenet-feature": (dict(student_channels=512, teacher_channels=512, use_ae=True, ae_channels=1024), 32, 7,
                         "ResNet-34→ResNet-18 feature head, 512 ch → AE 1024, B 32, 7×7"),
    # Tiny stand-ins with the same structure, for dry runs and tests.
    "tiny-feature": (dict(student_channels=16, teacher_channels=16), 4, 4, "tiny feature head, B 4, C 16, 4×4"),
    "tiny-logit": (dict(student_channels=10, teacher_channels=10, kernel_size=1, distance="kl"), 4, None,
                   "tiny logit head, K 10, B 4"),
    "tiny-ae": (dict(student_channels=16, teacher_channels=16, use_ae=True, ae_channels=24), 4, 3,
                "tiny feature head with AE 24, B 4, 3×3"),
}
DEFAULT_SHAPES = ("cifar-feature", "cifar-logit", "imagenet-feature")
PROVIDERS = ("naive", "ours-torch", "ours-triton", "ours-triton-graph")
# fp32 check tolerance.  CPU arithmetic differs only in rounding, but the gradients pass 5 unrolled steps and
# ~20 train-mode BatchNorms, whose backward subtracts means: at B 64, C 256, 8×8 the rounding grows to ~6e-4.
# On a GPU cuDNN and the Triton GEMMs use TF32.
CHECK_TOLERANCE = {"cpu": 2e-3, "cuda": 2e-2}
PROFILE_CATEGORIES = ("convolution", "batchnorm", "rest")


def _category(op_name: str) -> str:
    name = op_name.lower()
    if "batch_norm" in name or "batchnorm" in name:
        return "batchnorm"
    if "conv" in name:
        return "convolution"
    return "rest"


def profile_split(step, device, iterations: int = 2, warm_up: bool = True) -> dict[str, float]:
    """Milliseconds per iteration in convolutions, BatchNorm and the rest, by the self time of each operator
    (device time of the kernels each operator launched, on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_gpu(device) else [])
    if warm_up:
        step()
    with profile(activities=activities) as prof:
        for _ in range(iterations):
            step()
        if is_gpu(device):
            torch.cuda.synchronize(device)
    split = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for event in prof.key_averages():
        if is_gpu(device):  # the attribute's name changed across PyTorch versions
            microseconds = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
        else:
            microseconds = event.self_cpu_time_total
        split[_category(event.key)] += microseconds / 1e3 / iterations
    return split


class _HeadLoss(torch.nn.Module):
    """The head's total loss as a single-tensor output (what make_graphed_callables can capture)."""

    def __init__(self, head: DiffKDHead):
        super().__init__()
        self.head = head

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.head(student, teacher)["loss"]


def _train_step(call, student: torch.Tensor, teacher: torch.Tensor, loss_of=lambda out: out["loss"], owner=None):
    """One forward+backward of ``call``; gradients of ``owner`` (default: ``call``) reset to None each time, as
    an optimizer loop with zero_grad does."""
    owner = call if owner is None else owner

    def step():
        owner.zero_grad(set_to_none=True)
        student.grad = None
        loss_of(call(student, teacher)).backward()
    return step


def _inputs(kwargs: dict, batch: int, side: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = (side, side) if side is not None else ()
    student = torch.randn(batch, kwargs["student_channels"], *spatial, device=device, requires_grad=True)
    teacher = torch.randn(batch, kwargs["teacher_channels"], *spatial, device=device)
    return student, teacher


def provider_availability(device) -> dict[str, str | None]:
    """None for a provider that runs here, else why it is skipped."""
    gpu = is_gpu(device)
    return {
        "naive": None,
        "ours-torch": None,
        "ours-triton": None if gpu or interpreter_enabled() else
        "the Triton backend needs a CUDA GPU (TRITON_INTERPRET=1 runs it in the interpreter, for dry runs only)",
        "ours-triton-graph": None if gpu else "CUDA graphs need a CUDA GPU",
    }


def bench_head_shape(results: Results, section: dict, shape: str, device, *, providers, profile: bool,
                     plan: TimingPlan, scheduler: PaperScheduler, deadline: float | None) -> None:
    kwargs, batch, side, description = HEAD_SHAPES[shape]
    torch.manual_seed(0)
    reference = DiffKDHead(**kwargs, backend="torch").to(device)
    student, teacher = _inputs(kwargs, batch, side, device)
    available = provider_availability(device)
    modules = {}
    for name in providers:
        if available[name] is not None:
            Results.skip(section, f"{shape} / {name}", available[name])
            continue
        try:
            if name == "naive":
                modules[name] = NaiveDiffKDHead.from_head(reference, scheduler)
            elif name == "ours-torch":
                modules[name] = reference
            else:
                twin = DiffKDHead(**kwargs, backend="triton").to(device)
                twin.load_state_dict(reference.state_dict())
                modules[name] = twin
        except Exception as exc:  # a provider that cannot be built is recorded; the others still run
            Results.error(section, f"{shape} / {name}: build", exc)

    # Correctness first: every eager provider against ours-torch with the same explicit noises.
    tolerance = CHECK_TOLERANCE[torch.device(device).type]
    checks = {}
    for name, module in list(modules.items()):
        if name in ("ours-torch", "ours-triton-graph"):
            continue
        try:
            fresh = DiffKDHead(**kwargs, backend="torch").to(device)
            fresh.load_state_dict(reference.state_dict())
            errors = compare_heads(fresh, module, student, teacher, explicit_noises(fresh, student, teacher))
            checks[name] = worst_error(errors)
            section["records"].append({"shape": shape, "provider": name, "check": errors})
            if checks[name] > tolerance:
                raise AssertionError(f"differs from ours-torch: worst relative error {checks[name]:.3g} > "
                                     f"{tolerance:g} ({errors})")
        except Exception as exc:
            Results.error(section, f"{shape} / {name}: check", exc)
            modules.pop(name)

    steps = {}
    for name, module in modules.items():
        try:
            if name == "ours-triton-graph":
                # Fresh leaves: an input whose AccumulateGrad node an earlier eager run created on the default
                # stream invalidates the capture of the backward.
                graph_student = student.detach().clone().requires_grad_(student.requires_grad)
                graph_teacher = teacher.detach().clone()
                graphed = torch.cuda.make_graphed_callables(_HeadLoss(module), (graph_student, graph_teacher),
                                                            allow_unused_input=True)
                steps[name] = _train_step(graphed, graph_student, graph_teacher, loss_of=lambda loss: loss,
                                          owner=module)
            else:
                steps[name] = _train_step(module, student, teacher)
        except Exception as exc:
            Results.error(section, f"{shape} / {name}: setup", exc)
    if time_left(deadline) <= 0:
        Results.skip(section, f"{shape} timing", "deadline reached")
        return
    try:
        timings = time_candidates(steps, device, plan, deadline)
    except Exception as exc:
        Results.error(section, f"{shape}: timing", exc)
        return
    splits = {}
    if profile:
        # Profiling Triton's CPU interpreter would say nothing about the kernels.
        profiled = ("naive", "ours-torch", "ours-triton") if is_gpu(device) else ("naive", "ours-torch")
        for name in profiled:
            if name in steps and time_left(deadline) > 0:
                try:
                    splits[name] = profile_split(steps[name], device, iterations=min(2, plan.repeats),
                                                 warm_up=plan.warmup > 0)
                except Exception as exc:
                    Results.error(section, f"{shape} / {name}: profile", exc)

    baseline = timings.get("naive")
    rows = []
    for name, timing in timings.items():
        speedup = baseline.median_ms / timing.median_ms if baseline else None
        split = splits.get(name)
        split_cells = [split[c] for c in PROFILE_CATEGORIES] if split else [None] * len(PROFILE_CATEGORIES)
        check = "reference" if name == "ours-torch" else (
            f"{checks[name]:.1e}" if name in checks else "replays ours-triton")
        rows.append([name, timing.median_ms, batch / timing.median_ms * 1e3, speedup, *split_cells, check])
        section["records"].append({"shape": shape, "provider": name, "batch": batch, **timing.as_dict(),
                                   "speedup_vs_naive": speedup, "profile_ms": split})
    notes = [f"naive scheduler: {scheduler.source}"]
    if splits:
        notes.append("conv / BN / rest: torch.profiler self time of each operator per iteration"
                     + (" (device time of the kernels it launched)" if is_gpu(device) else " (wall clock)"))
    if not is_gpu(device) and "ours-triton" in timings:
        notes.append("ours-triton ran in Triton's CPU interpreter: its time is not a performance number")
    section["tables"].append(make_table(
        f"{description}: forward+backward",
        ["provider", "ms / iter", "samples/s", "× vs naive", "conv ms", "BN ms", "rest ms", "check (rel err)"],
        rows, notes))
    results.flush()


def run_head_benchmark(results: Results, device, *, shapes=DEFAULT_SHAPES, providers=PROVIDERS, profile=True,
                       plan: TimingPlan = TimingPlan(), deadline: float | None = None,
                       section_name: str = "head") -> dict:
    section = results.section(section_name)
    scheduler = PaperScheduler()
    section["notes"].append(f"naive head steps {scheduler.source}")
    for shape in shapes:
        if time_left(deadline) <= 0:
            Results.skip(section, shape, "deadline reached")
            continue
        try:
            bench_head_shape(results, section, shape, device, providers=providers, profile=profile,
                             plan=plan, scheduler=scheduler, deadline=deadline)
        except Exception as exc:  # one shape failing (e.g. out of memory) leaves the others
            Results.error(section, shape, exc)
        results.flush()
    section["status"] = "done"
    results.flush()
    return section


def main(argv=None) -> int:
    parser = _cli.script_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated head shapes from: {', '.join(HEAD_SHAPES)}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"from: {', '.join(PROVIDERS)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds on the CPU (default 7)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler split")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    providers = [p for p in args.providers.split(",") if p]
    for value, known, flag in ((shapes, HEAD_SHAPES, "--shapes"), (providers, PROVIDERS, "--providers")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    device, results = _cli.prepare(args)
    section = run_head_benchmark(results, device, shapes=shapes, providers=providers, profile=not args.no_profile,
                                 plan=TimingPlan(repeats=args.repeats, clock=args.clock))
    print_section("head", section)
    return 1 if section["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
