"""Training step of the Fashion-MNIST demo on the CPU: bfloat16 autocast against float32, in one process.

The demo's models and method (resnet14 teacher, resnet8 student, DiffKD with feature and logit heads; and the
student alone), batch 64 of 1×28×28 images: forward, backward and SGD step.  The float32 and bfloat16 steps are
timed interleaved after a warm-up (benchmarks/_timing.py), so their ratio holds on a shared machine.  It also
prints whether this CPU computes in bfloat16 natively (``diffkd.cpu_features``): without AVX-512 BF16 or AMX
the bfloat16 step is expected to be slower.

    python benchmarks/bench_cpu_bf16.py --threads 1 --clock cpu --json benchmarks/results/
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _cli  # noqa: E402
from benchmarks._report import Results, make_table, print_section  # noqa: E402
from benchmarks._timing import TimingPlan, time_interleaved  # noqa: E402
from diffkd.cpu_features import cpu_supports_native_bf16  # noqa: E402
from diffkd.distill import build_distiller  # noqa: E402
from diffkd.methods import method_settings  # noqa: E402
from diffkd.models import create_model, default_taps  # noqa: E402

TEACHER, STUDENT, INPUT_SIZE, CLASSES = "resnet14", "resnet8", (1, 28, 28), 10
METHODS = ("none", "diffkd")


def demo_step(method: str, batch: int, dtype: torch.dtype | None):
    """A closure running one training step of the demo's ``method`` (autocast to ``dtype``; None: float32)."""
    torch.manual_seed(0)
    student = create_model(STUDENT, num_classes=CLASSES, in_chans=INPUT_SIZE[0])
    teacher = create_model(TEACHER, num_classes=CLASSES, in_chans=INPUT_SIZE[0])
    settings = method_settings(method, "fashion-mnist")
    taps = {role: default_taps(name, model, INPUT_SIZE) for role, name, model in
            (("student", STUDENT, student), ("teacher", TEACHER, teacher))}
    distiller = build_distiller(settings, student, teacher if settings.head_kinds else None,
                                student_taps=taps["student"], teacher_taps=taps["teacher"], input_size=INPUT_SIZE,
                                log=lambda line: None).train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, targets = torch.randn(batch, *INPUT_SIZE), torch.randint(0, CLASSES, (batch,))

    def step():
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext():
            loss = distiller(images, targets)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_bf16_benchmark(results: Results, *, methods=METHODS, batch: int = 64, plan: TimingPlan) -> dict:
    section = results.section("cpu_bf16_step")
    native = cpu_supports_native_bf16()
    section["notes"].append(f"native bfloat16 on this CPU (AVX-512 BF16 or AMX-BF16): {'yes' if native else 'no'}")
    steps = {f"{method} {label}": demo_step(method, batch, dtype) for method in methods
             for label, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    timings = time_interleaved(steps, plan=plan)
    rows = []
    for method in methods:
        fp32, bf16 = timings[f"{method} fp32"], timings[f"{method} bf16"]
        rows.append([method, fp32.median_ms, bf16.median_ms, fp32.median_ms / bf16.median_ms])
        section["records"] += [{"method": method, "precision": label, **timings[f"{method} {label}"].as_dict()}
                               for label in ("fp32", "bf16")]
    section["tables"].append(make_table(
        f"Demo training step ({TEACHER} → {STUDENT}, batch {batch}, {INPUT_SIZE[1]}×{INPUT_SIZE[2]}), "
        f"{plan.clock} clock", ["method", "fp32 (ms)", "bf16 autocast (ms)", "fp32 / bf16"], rows,
        notes=["fp32 / bf16 above 1: the bfloat16 step is faster"]))
    section["status"] = "done"
    results.flush()
    return section


def main(argv=None) -> int:
    parser = _cli.script_parser(__doc__)
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64, the demo's)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    if set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {', '.join(sorted(set(methods) - set(METHODS)))}; choose from "
                     f"{', '.join(METHODS)}")
    if args.batch < 2:
        parser.error(f"--batch must be >= 2 (the heads' BatchNorm trains on the batch), got {args.batch}")
    device, results = _cli.prepare(args)
    if device.type != "cpu":
        parser.error("this benchmark measures the CPU: pass --device cpu")
    section = run_bf16_benchmark(results, methods=methods, batch=args.batch,
                                 plan=TimingPlan(warmup=2, repeats=args.repeats, clock=args.clock))
    print_section("cpu_bf16_step", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
