"""The one-call GPU check: what only a GPU can verify first, inside an internal deadline (default 7 minutes).

    python benchmarks/gpu_check.py --out benchmarks/results            # on the GPU machine, ≤ 7 minutes
    python benchmarks/gpu_check.py --out /tmp/check --dry-run          # CPU: tiny shapes, the same plumbing

Sections, in order of value (each one's results are written to the JSON as soon as they exist, so a run that is
cut off still reports; a failing section is recorded and the next one runs; each section gets a share of the time
left, in proportion to SECTION_BUDGETS_S, and the deadline cuts what does not fit):
  train_step   a whole training step (teacher forward, student forward+backward, both DiffKD heads, SGD step) in
               images/s at ResNet-34 → ResNet-18 (224², batch 64) and ResNet32x4 → ResNet8x4 (CIFAR, batch 64):
               none, kd, DiffKD with the paper's code, eager torch, eager Triton, CUDAGraphHead (graphed), and
               torch.compile(mode="reduce-overhead") if time allows.  First, per pair, CUDAGraphHead against an eager
               twin with the same kernels over 3 SGD steps (same random state per step) and its own self-check;
               then the targets: graphed step / KD step ≤ 1.5, paper's code / graphed ≥ 1.3, compile / graphed ≥ 1.2
  graphs       benchmarks.graph_checks: pytest tests/test_graphs_gpu.py (graphed Triton heads against eager ones
               over accumulated steps, bf16, channels-last, a new shape, DDP) and the cost of the gradient copies
               each replay makes (PyTorch issue 181723)
  parity       benchmarks.parity.run_parity: the kernels against the reference at real shapes, CUDA-graph replay
  head         the whole head, forward+backward: naive (paper's code) vs ours, at the three head shapes
  chain        the 5-step chain with Φ, forward+backward, B 32, C 1024, 7×7, fp32 and bf16: diffusers (when
               installed), eager, torch.compile (this shape only, default mode), triton, triton + CUDA graph
  step_kernel  the fused DDIM step alone: size sweep to 1 GB per tensor as GB/s and fraction of copy bandwidth,
               µs per step at real shapes
Output: <out>/<card>-<date>.json and .md (e.g. benchmarks/results/nvidia-h200-2026-11-30.json); the last lines
printed are a summary of the verdicts (equality, self-check, targets, parity).
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

# Seconds each section may use at the default 420 s deadline; a section starting with T seconds left gets
# T · budget / (sum of the budgets of it and the sections after it), so time one leaves over goes to the next ones.
SECTION_BUDGETS_S = {"train_step": 150, "graphs": 120, "parity": 60, "head": 40, "chain": 35, "step_kernel": 15}
SECTIONS = tuple(SECTION_BUDGETS_S)
DEFAULT_DEADLINE_S = 420  # the machine is lent for 8 minutes of a run: start-up and transfers need the rest
COMPILE_RESERVE_S = 45  # torch.compile of the chain's forward+backward can take this long on a fresh machine
STEP_COMPILE_RESERVE_S = 60  # torch.compile(mode="reduce-overhead") of a pair's two heads, forward+backward
TRAIN_STEP_MIN_S = 25   # building ResNet-34/18 and timing the methods needs at least about this much
FLUSH_INTERVAL_S = 5

GPU_MATRIX = {
    "sweep_mb": (1, 4, 16, 64, 256, 1024),
    "real_step_shapes": ((32, 1024, 7), (256, 1024, 7), (64, 256, 8), (256, 256, 8)),
    "step_dtypes": ("fp32", "bf16"),
    "chain_shapes": ("feature-1024-7-32",),
    "chain_dtypes": ("fp32", "bf16"),
    "chain_providers": ("diffusers", "eager", "compile", "triton", "triton-graph"),
    "head_shapes": ("cifar-feature", "cifar-logit", "imagenet-feature"),
    "step_pairs": ("imagenet", "cifar"),
    "step_batch": None,  # each pair's GPU batch: 64
    "step_methods": None,  # every method
    "plan": TimingPlan(warmup=2, repeats=3, gpu_rep_ms=100),
    "step_plan": TimingPlan(warmup=1, repeats=3, gpu_rep_ms=200),
    "step_compile_reserve_s": STEP_COMPILE_RESERVE_S,
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
    # Triton's interpreter takes ~10 s per training step with two heads; the head section runs its kernels.
    "step_methods": ("none", "kd", "diffkd-paper", "diffkd-torch", "diffkd-graphed"),
    "plan": TimingPlan(warmup=0, repeats=1),
    "step_plan": TimingPlan(warmup=0, repeats=1),
    "step_compile_reserve_s": 0,
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
    from benchmarks import bench_ddim, bench_head, bench_step, graph_checks  # after the header: imports take a while

    if name == "parity":
        run_parity_section(results, deadline)
    elif name == "graphs":
        graph_checks.run_graphs_section(results, device, deadline)
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
        section = bench_step.run_step_benchmark(results, device, pairs=matrix["step_pairs"],
                                                methods=matrix["step_methods"], batch=matrix["step_batch"],
                                                plan=matrix["step_plan"], check_equality=True, deadline=deadline,
                                                compile_reserve_s=matrix["step_compile_reserve_s"])
        left_out = set(bench_step.default_methods(device)) - set(matrix["step_methods"] or bench_step.METHODS)
        for method in sorted(left_out):
            Results.skip(section, method, "left out of the dry run (Triton's interpreter takes ~10 s per step; the "
                                          "head section runs the kernels)")


def summary_lines(sections: dict) -> list[str]:
    """The verdicts a reader looks for first, one line each."""
    lines = []
    train = sections.get("train_step", {})
    for pair, report in train.get("graph_equality", {}).items():
        heads = report["heads"]
        lines.append(f"train_step {pair}: CUDAGraphHead vs eager twin over {report['steps']} steps "
                     f"{'PASSED' if report['passed'] else 'FAILED'} (worst relative error "
                     f"{max(h['worst'] for h in heads.values()):.2g}); "
                     + "; ".join(f"{kind} head {h['path']}" + (f" (fell back: {h['fallback_reason']})"
                                                               if h["fallback_reason"] else "")
                                 for kind, h in heads.items()))
    for pair, heads in train.get("graphed_heads", {}).items():
        checks = [passed for head in heads.values() for passed in head["self_checks_passed"]]
        lines.append(f"train_step {pair}: timed CUDAGraphHead heads ran "
                     f"{', '.join(sorted({h['path'] for h in heads.values()}))}; self-check "
                     + ("passed" if checks and all(checks) else "FAILED" if checks else "did not run"))
    for pair, targets in train.get("targets", {}).items():
        lines.append(f"train_step {pair}: " + "; ".join(
            f"{t['ratio']} {t['value']:.2f} (target {t['target']}: {'met' if t['met'] else 'NOT met'})"
            for t in targets))
    graphs = sections.get("graphs", {})
    if "gpu_tests" in graphs:
        lines.append(f"graphs: tests/test_graphs_gpu.py {graphs['gpu_tests']['outcome']} "
                     f"({graphs['gpu_tests']['summary']})")
    for row in graphs.get("gradient_copy", []):
        device_ms = row["owned_copies device ms"]
        lines.append(f"graphs: gradient copies of the {row['head']} head ({row['tensors']} tensors) "
                     + (f"{device_ms:.3f} ms device, " if device_ms is not None else "")
                     + f"{row['owned_copies host us']:.0f} µs host")
    parity = sections.get("parity", {}).get("report", {})
    if "passed" in parity:
        lines.append(f"parity: {'PASSED' if parity['passed'] else 'FAILED'}")
    for name, section in sections.items():
        if section.get("errors"):
            lines.append(f"{name}: {len(section['errors'])} error(s), first: {section['errors'][0]['what']}")
        if section.get("status") == "skipped":
            lines.append(f"{name}: skipped ({section['skipped'][0]['why']})")
    return lines


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
    print(f"GPU check on {meta['device_name']}{' (dry run: tiny shapes)' if args.dry_run else ''}: sections "
          f"{', '.join(sections)} within {args.deadline:.0f} s; results go to {path} (+ .md) as they come",
          flush=True)
    scale = args.deadline / sum(SECTION_BUDGETS_S[name] for name in sections)
    for index, name in enumerate(sections):
        remaining = time_left(deadline)
        if remaining <= 0 or (name == "train_step" and remaining < TRAIN_STEP_MIN_S * scale):
            Results.skip(results.section(name), name, f"not enough time left ({remaining:.0f} s)")
            results.data["sections"][name]["status"] = "skipped"
            results.flush()
            continue
        # This section's share of the time left: what earlier sections leave over goes to the later ones.
        share = remaining * SECTION_BUDGETS_S[name] / sum(SECTION_BUDGETS_S[n] for n in sections[index:])
        section_deadline = min(deadline, time.monotonic() + share)
        print(f"--- {name}: up to {share:.0f} s", flush=True)
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
    results.data["summary"] = summary_lines(results.data["sections"])
    results.flush()
    print("=== summary", *results.data["summary"], sep="\n", flush=True)
    print(f"results: {path} and {path.with_suffix('.md')} ({results.data['meta']['total_seconds']:.0f} s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(started_at=START))
