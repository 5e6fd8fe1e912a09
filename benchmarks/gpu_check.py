"""The one-call GPU check: kernel parity first, then a reduced benchmark matrix, inside an internal deadline.

Sections, in order (each one's results are written to the JSON as soon as they exist, so a run that is cut off
still reports; a failing section is recorded and the next one runs):
  parity       benchmarks.parity.run_parity: the kernels against the reference at real shapes, CUDA-graph replay
  step_kernel  the fused DDIM step alone: size sweep to 1 GB per tensor as GB/s and fraction of copy bandwidth,
               µs per step at real shapes
  chain        the 5-step chain with Φ, forward+backward, B 32, C 1024, 7×7, fp32 and bf16: diffusers (when
               installed), eager, torch.compile (this shape only, default mode), triton, triton + CUDA graph
  head         the whole head, forward+backward: naive (paper's code) vs ours, at the three head shapes
  train_step   ResNet-34 → ResNet-18 training step at batch 32 (student, KD, DiffKD), if time allows
Output: <out>/<card>-<date>.json and .md (e.g. benchmarks/results/nvidia-h100-80gb-hbm3-2025-01-01.json).

    python benchmarks/gpu_check.py --out benchmarks/results            # on the GPU machine, ~5 minutes
    python benchmarks/gpu_check.py --out /tmp/check --dry-run          # CPU: tiny shapes, seconds
"""
from __future__ import annotations

import time

START = time.monotonic()  # the deadline counts from here, before the heavy imports

import argparse  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._report import Results, default_results_name, make_table, print_section  # noqa: E402
from benchmarks._timing import (TimingPlan, card_slug, configure_cpu, configure_gpu_math, environment,  # noqa: E402
                                time_left)

# Seconds each section may use at the default 300 s deadline with every section; the sections run share the
# deadline in proportion to these.  A section's share counts from the moment it starts, so time one leaves over
# goes to the next ones.
SECTION_BUDGETS_S = {"parity": 90, "step_kernel": 25, "chain": 85, "head": 55, "train_step": 45}
SECTIONS = tuple(SECTION_BUDGETS_S)
DEFAULT_DEADLINE_S = 300
COMPILE_RESERVE_S = 45  # torch.compile of the chain's forward+backward can take this long on a fresh machine
TRAIN_STEP_MIN_S = 25   # building ResNet-34/18 and timing three methods needs about this much
FLUSH_INTERVAL_S = 5

GPU_MATRIX = {
    "sweep_mb": (1, 4, 16, 64, 256, 1024),
    "real_step_shapes": ((32, 1024, 7), (256, 1024, 7), (64, 256, 8), (256, 256, 8)),
    "step_dtypes": ("fp32", "bf16"),
    "chain_shapes": ("feature-1024-7-32",),
    "chain_dtypes": ("fp32", "bf16"),
    "chain_providers": ("diffusers", "eager", "compile", "triton", "triton-graph"),
    "head_shapes": ("cifar-feature", "cifar-logit", "imagenet-feature"),
    "step_pairs": ("imagenet",),
    "step_batch": 32,
    "plan": TimingPlan(warmup=2, repeats=3, gpu_rep_ms=100),
    "step_plan": TimingPlan(warmup=1, repeats=3, gpu_rep_ms=300),
}
DRY_RUN_MATRIX = {
    "sweep_mb": (1,),
    "real_step_shapes": ((4, 16, 4),),
    "step_dtypes": ("fp32",),
    "chain_shapes": ("feature-16-4-4",),
    "chain_dtypes": ("fp32", "bf16"),
    "chain_providers": ("diffusers", "eager", "triton", "triton-graph"),  # compile takes minutes on a CPU
    "head_shapes": ("tiny-feature", "tiny-logit", "tiny-ae"),
    "step_pairs": ("tiny",),
    "step_batch": 4,
    "plan": TimingPlan(warmup=0, repeats=1),
    "step_plan": TimingPlan(warmup=0, repeats=1),
}


def _periodic_flush(results: Results, stop: threading.Event) -> None:
    while not stop.wait(FLUSH_INTERVAL_S):
        results.flush()


def run_parity_section(results: Results, deadline: float) -> None:
    """benchmarks.parity.run_parity(report, deadline), guarded: a missing module or a failure is recorded.

    It runs in the main thread; a helper thread rewrites the JSON every few seconds meanwhile, so the parity
    results recorded so far survive a cut-off run.
    """
    section = results.section("parity")
    try:
        from benchmarks.parity import run_parity
    except Exception as exc:  # absent or broken module: report it and go on to the benchmarks
        Results.error(section, "import benchmarks.parity", exc)
        section["status"] = "unavailable"
        return
    report = section.setdefault("report", {})
    stop = threading.Event()
    flusher = threading.Thread(target=_periodic_flush, args=(results, stop), daemon=True)
    flusher.start()
    try:
        summary = run_parity(report, deadline)
        if summary is not None and summary is not report:
            section["summary"] = summary
        section["status"] = "done"
    except Exception as exc:
        Results.error(section, "run_parity", exc)
        section["status"] = "error"
    finally:
        stop.set()
        flusher.join()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    section["tables"].append(parity_table(report))
    if "passed" in report:
        section["notes"].append(f"parity {'PASSED' if report['passed'] else 'FAILED'} ({report.get('mode', '')})")


def parity_table(report: dict) -> dict:
    """One row per check of the parity report: outcome, seconds, and the reason or first error line."""
    rows = []
    for name, check in report.get("checks", {}).items():
        if not isinstance(check, dict):
            rows.append([name, "?", None, str(check)[:120]])
            continue
        if "skipped" in check:
            outcome, detail = "skipped", str(check["skipped"])
        else:
            outcome = "passed" if check.get("passed") else "FAILED"
            error = str(check.get("error", "")).strip().splitlines()
            detail = error[-1] if error else ""
        rows.append([name, outcome, check.get("seconds"), detail[:160]])
    return make_table("Kernel parity (benchmarks/parity.py)", ["check", "outcome", "s", "detail"], rows)


def run_section(name: str, results: Results, device, matrix: dict, deadline: float) -> None:
    from benchmarks import bench_ddim, bench_head, bench_step  # after parity: their imports take a while

    if name == "parity":
        run_parity_section(results, deadline)
    elif name == "step_kernel":
        bench_ddim.run_step_kernel_benchmark(results, device, sizes_mb=matrix["sweep_mb"],
                                             real_shapes=matrix["real_step_shapes"], dtypes=matrix["step_dtypes"],
                                             plan=matrix["plan"], deadline=deadline)
    elif name == "chain":
        bench_ddim.run_chain_benchmark(results, device, shapes=matrix["chain_shapes"], dtypes=matrix["chain_dtypes"],
                                       modes=("fwdbwd",), providers=matrix["chain_providers"], plan=matrix["plan"],
                                       deadline=deadline, compile_reserve_s=COMPILE_RESERVE_S if device.type == "cuda"
                                       else 0)
    elif name == "head":
        bench_head.run_head_benchmark(results, device, shapes=matrix["head_shapes"], plan=matrix["plan"],
                                      deadline=deadline)
    elif name == "train_step":
        bench_step.run_step_benchmark(results, device, pairs=matrix["step_pairs"], batch=matrix["step_batch"],
                                      plan=matrix["step_plan"], deadline=deadline)


def main(argv=None, started_at: float | None = None) -> int:
    """Runs the check; the deadline counts from ``started_at`` (a time.monotonic() value; default: now)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for <card>-<date>.json and .md")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds for the whole run, counted from start-up (default {DEFAULT_DEADLINE_S})")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on whatever device is present (the CPU path the tests run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.deadline <= 0:
        parser.error(f"--deadline must be positive seconds, got {args.deadline}")
    if not torch.cuda.is_available() and not args.dry_run:
        parser.error("no CUDA device is visible; pass --dry-run to exercise the script on the CPU with tiny shapes")

    start = time.monotonic() if started_at is None else started_at
    deadline = start + args.deadline
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A dry run is a plumbing check: one thread keeps it quick and steady on a shared CPU.
    configure_cpu(1 if args.dry_run else None)
    if device.type == "cuda":
        configure_gpu_math(tf32=True)  # every fp32 provider in TF32 (parity sets its own modes and restores these)
    matrix = DRY_RUN_MATRIX if args.dry_run else GPU_MATRIX
    slug = card_slug(device) + ("-dryrun" if args.dry_run else "")
    path = Path(args.out) / f"{default_results_name(slug)}.json"
    meta = {**environment(device), "script": "benchmarks/gpu_check.py", "dry_run": args.dry_run,
            "deadline_s": args.deadline}
    results = Results(path, meta)
    results.data["sections"] = {}  # a rerun on the same day replaces the file's sections
    results.flush()
    # The chosen sections share the deadline in proportion to their budgets.
    scale = args.deadline / sum(SECTION_BUDGETS_S[name] for name in sections)
    for name in sections:
        remaining = time_left(deadline)
        if remaining <= 0 or (name == "train_step" and remaining < TRAIN_STEP_MIN_S * scale):
            Results.skip(results.section(name), name, f"not enough time left ({remaining:.0f} s)")
            results.data["sections"][name]["status"] = "skipped"
            results.flush()
            continue
        section_deadline = min(deadline, time.monotonic() + SECTION_BUDGETS_S[name] * scale)
        began = time.monotonic()
        try:
            run_section(name, results, device, matrix, section_deadline)
        except Exception as exc:  # never let one section end the run
            section = results.data["sections"].get(name) or results.section(name)
            Results.error(section, name, exc)
            section["status"] = "error"
        section = results.data["sections"][name]
        section["seconds"] = round(time.monotonic() - began, 1)
        results.flush()
        print_section(name, section)
    results.data["meta"]["total_seconds"] = round(time.monotonic() - start, 1)
    results.flush()
    print(f"results: {path} and {path.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(started_at=START))
