"""The demos (``python -m diffkd.train`` with no arguments: Fashion-MNIST classification; ``--demo --task
detection|segmentation``: the Fashion-scenes demos) and their teacher cache.

A teacher is trained briefly (or reused from ``$DIFFKD_CACHE/teachers``), then a smaller student is trained alone
and with DiffKD for each seed, and a table compares them.  Everything lands in one demo folder; ``--demo --resume
[FOLDER]`` continues the latest (or the given) demo: finished runs are skipped, an interrupted one continues where
it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from diffkd.files import load_weights_file, write_text_atomically
from diffkd.train.checkpoint import export_student, read_checkpoint
from diffkd.train.cli import build_parser
from diffkd.train.errors import UsageError
from diffkd.train.loop import RunResult
from diffkd.train.resume import resolve_new_run, resolve_resume
from diffkd.train.run_folder import RunFolder, stored_args
from diffkd.train.runs import run
from diffkd.train.runtime import Runtime, setup_runtime
from diffkd.train.tasks import task_of

CACHE_ENV = "DIFFKD_CACHE"
# Per task: the table's title, what it measures, what the data are.
DEMO_LABELS = {"classification": ("Fashion-MNIST demo", "test top-1 (%)", "images"),
               "detection": ("Fashion-scenes detection demo", "test box mAP@[.5:.95] (%)", "scenes"),
               "segmentation": ("Fashion-scenes segmentation demo", "test mIoU (%)", "scenes")}
DEMO_SETTINGS = "demo.yaml"
# One line per invocation of the demo (the first and every --demo --resume): its wall-clock seconds.
WALL_TIMES = "wall_times.txt"
# Settings that shape the demo's teacher: its cache key.
TEACHER_RECIPE = ("dataset", "student", "epochs", "train_subset", "batch_size", "lr", "opt", "momentum", "nesterov",
                  "weight_decay", "sched", "warmup_epochs", "min_lr", "seed", "max_steps", "amp")


def cache_folder() -> Path:
    """Where the demo keeps its trained teachers: $DIFFKD_CACHE, else ~/.cache/diffkd."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffkd")


def cached_demo_teacher(dataset: str, teacher: str | None) -> tuple[str, str]:
    """(architecture, file) of the newest teacher the demo cached for ``dataset`` (and ``teacher``, if given):
    what ``--teacher-ckpt demo`` means."""
    folder = cache_folder() / "teachers"
    files = sorted(folder.glob(f"{dataset}-{teacher or '*'}-*.pth"), key=lambda path: path.stat().st_mtime)
    if not files:
        which = f"a {teacher} teacher" if teacher else "a teacher"
        raise UsageError(f"--teacher-ckpt demo: the demo has not cached {which} for {dataset} in {folder}; run the "
                         f"demo first (python -m diffkd.train), or pass --teacher-ckpt FILE")
    try:
        arch = load_weights_file(files[-1]).get("arch")
    except ValueError as error:
        raise UsageError(str(error)) from None
    return teacher or arch, str(files[-1])


def _run_args(base: argparse.Namespace, **changes) -> argparse.Namespace:
    values = {**vars(base), "demo": False, "resume": None, "config": None}
    values.update(changes)
    return argparse.Namespace(**values)


def _result_of_finished(folder: RunFolder, checkpoint: dict, metric: str) -> RunResult:
    key = f"val_{metric}"
    last = next((row[key] for row in reversed(checkpoint["history"]) if key in row), float("nan"))
    return RunResult(folder, last, checkpoint["best"], checkpoint["best_epoch"], checkpoint["teacher"],
                     checkpoint.get("test_images", 0), finished=True)


def _sub_run(run_args: argparse.Namespace, runtime: Runtime, argv: Sequence[str], resume_command: str,
             label: str) -> RunResult:
    """One run of the demo: skipped when finished, continued when interrupted, else started."""
    folder = RunFolder(Path(run_args.output) / run_args.experiment)
    if folder.has_checkpoint:
        checkpoint = read_checkpoint(folder.last)
        if checkpoint["epoch"] >= checkpoint["args"]["epochs"]:
            runtime.log(f"== {label}: finished earlier, skipped ({folder})")
            return _result_of_finished(folder, checkpoint, task_of(run_args.task).metric)
        runtime.log(f"== {label}: continuing the interrupted run")
        request = argparse.Namespace(resume=str(folder.path), max_steps=run_args.max_steps)
        merged, checkpoint, notes = resolve_resume(request, set())
        for note in notes:
            runtime.log(note)
        return run(merged, runtime, argv, checkpoint, resume_command=resume_command)
    runtime.log(f"== {label}")
    return run(run_args, runtime, argv, resume_command=resume_command)


def _demo_teacher(args: argparse.Namespace, folder: Path, runtime: Runtime, argv: Sequence[str],
                  resume_command: str) -> tuple[Path, bool]:
    """The demo teacher's weight file, and whether it came from the cache (else it is trained now, method none,
    and cached).  The cache key covers every setting that shapes the teacher."""
    teacher_args = _run_args(args, method="none", student=args.teacher, teacher=None, teacher_ckpt=None,
                             teacher_ckpt_sha256=None, epochs=args.demo_teacher_epochs,
                             train_subset=args.demo_teacher_subset, eval_interval=args.demo_teacher_epochs,
                             seed=args.demo_seeds[0], output=str(folder), experiment="teacher")
    dense = ("task", "fpn_channels", "image_size") if args.task != "classification" else ()
    recipe = {k: getattr(teacher_args, k) for k in (*TEACHER_RECIPE, *dense)}
    key = hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:12]
    cached = cache_folder() / "teachers" / f"{args.dataset}-{args.teacher}-{key}.pth"
    if cached.is_file():
        runtime.log(f"== teacher {args.teacher}: reusing {cached} (delete it to train the teacher again)")
        return cached, True
    runtime.log(f"note: the teacher {args.teacher} ({teacher_args.epochs} epoch(s)) is cached as {cached} once "
                f"trained; --teacher-ckpt demo reuses it in other runs")
    result = _sub_run(teacher_args, runtime, argv, resume_command, f"teacher {args.teacher}")
    if runtime.is_main:
        cached.parent.mkdir(parents=True, exist_ok=True)
        export_student(read_checkpoint(result.folder.last), cached)
    runtime.barrier()
    return cached, False


def _latest_demo(output: Path) -> Path:
    demos = sorted((path.parent for path in output.glob(f"*/{DEMO_SETTINGS}")),
                   key=lambda path: (path / DEMO_SETTINGS).stat().st_mtime)
    if not demos:
        raise UsageError(f"--demo --resume: no demo folder in {output}; pass the demo folder "
                         f"(--demo --resume output/demo-...) or start a demo without --resume")
    return demos[-1]


def _claim_new_demo_folder(output: Path) -> Path:
    """A new folder ``demo-<date>-<time>`` in ``output``, created here so that it is this demo's alone: a second
    demo started in the same second (``mkdir`` fails for it) takes ``...-2``, ``...-3``."""
    stamp = f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    output.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        folder = output / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def _demo_folder_and_settings(args: argparse.Namespace, explicit: set[str]) -> tuple[Path | None,
                                                                                     argparse.Namespace]:
    """The demo's folder (None: a new one, claimed once the runtime is up) and its settings."""
    if args.resume is None:
        for note in resolve_new_run(args):
            print(note, flush=True)
        if args.experiment:
            folder = Path(args.output) / args.experiment
            RunFolder(folder).check_usable(resume=False)
            if (folder / DEMO_SETTINGS).exists():
                raise UsageError(f"{folder} already holds a demo; continue it with --demo --resume {folder}, or pass "
                                 f"--experiment NAME for a new one (nothing was overwritten)")
            return folder, args
        RunFolder(Path(args.output)).check_usable(resume=True)  # --output naming a file: before anything is written
        return None, args
    folder = Path(args.resume) if args.resume else _latest_demo(Path(args.output))
    settings_file = folder / DEMO_SETTINGS
    if not settings_file.is_file():
        raise UsageError(f"--demo --resume {folder}: not a demo folder (it has no {DEMO_SETTINGS}); for a single run "
                         f"use --resume without --demo")
    saved = yaml.safe_load(settings_file.read_text())
    merged = argparse.Namespace(**{**vars(build_parser().parse_args([])), **saved})
    merged.max_steps, merged.resume, merged.output = args.max_steps, str(folder), str(folder.parent)
    changed = sorted(key for key in explicit - {"max_steps", "demo", "output"} if saved.get(key) != getattr(args, key))
    if changed:
        raise UsageError(f"--demo --resume continues the saved demo, whose settings differ from the ones given "
                         f"({', '.join(changed)}); drop those flags, or start a new demo")
    return folder, merged


def _mean_spread(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def run_demo(args: argparse.Namespace, explicit: set[str], argv: Sequence[str]) -> tuple[str, Runtime]:
    """Teacher, then the student alone and with DiffKD for each seed; prints and returns the results table."""
    started = time.perf_counter()
    folder, args = _demo_folder_and_settings(args, explicit)
    runtime = setup_runtime(args.device, args.threads)
    if folder is None:
        folder = runtime.broadcast_from_main(_claim_new_demo_folder(Path(args.output)) if runtime.is_main else None)
    resume_command = f"python -m diffkd.train --demo --resume {folder}"
    runtime.current_status = lambda: f"every finished run of the demo is kept; continue with: {resume_command}"
    if runtime.is_main and not (folder / DEMO_SETTINGS).exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / DEMO_SETTINGS, yaml.safe_dump(stored_args(args), sort_keys=False))
    runtime.barrier()
    try:
        return _run_demo_in(folder, args, runtime, argv, resume_command, started), runtime
    finally:
        if runtime.is_main:  # also when stopped or failed: a resumed demo's table sums every invocation
            with open(folder / WALL_TIMES, "a") as file:
                file.write(f"{time.perf_counter() - started:.1f}\n")


def _earlier_wall_times(folder: Path) -> list[float]:
    path = folder / WALL_TIMES
    return [float(line) for line in path.read_text().split()] if path.is_file() else []


def _run_demo_in(folder: Path, args: argparse.Namespace, runtime: Runtime, argv: Sequence[str],
                 resume_command: str, started: float) -> str:
    """The demo's runs in its folder, then its table and comparison chart."""
    teacher_ckpt, reused = _demo_teacher(args, folder, runtime, argv, resume_command)
    results: dict[str, list[RunResult]] = {"none": [], "diffkd": []}
    for seed in args.demo_seeds:
        for method, results_of_method in results.items():
            label = f"student {args.student}, {'alone' if method == 'none' else 'with DiffKD'}, seed {seed}"
            teacher = dict(teacher=args.teacher, teacher_ckpt=str(teacher_ckpt)) if method == "diffkd" else dict(
                teacher=None, teacher_ckpt=None)
            run_args = _run_args(args, method=method, seed=seed, output=str(folder), experiment=f"{method}-seed{seed}",
                                 **teacher)
            resolve_new_run(run_args)
            results_of_method.append(_sub_run(run_args, runtime, argv, resume_command, label))
    wall_times = [*_earlier_wall_times(folder), time.perf_counter() - started]
    table = _table(args, results, reused, folder, wall_times)
    runtime.log(table)
    if runtime.is_main:
        write_text_atomically(folder / "results.txt", table + "\n")
        from diffkd.plots import plot_demo_comparison
        plot_demo_comparison({"alone": [(seed, r.last) for seed, r in zip(args.demo_seeds, results["none"])],
                              "with DiffKD": [(seed, r.last) for seed, r in zip(args.demo_seeds,
                                                                                      results["diffkd"])]},
                             folder / "comparison.png",
                             title=f"{folder.name}: {args.student} on {args.dataset}, alone and distilled by DiffKD "
                                   f"from teacher {args.teacher}",
                             ylabel=DEMO_LABELS[args.task][1], teacher=(args.teacher, results["diffkd"][0].teacher))
    return table


def _table(args: argparse.Namespace, results: dict[str, list[RunResult]], reused: bool, folder: Path,
           wall_times: list[float]) -> str:
    alone = [r.last for r in results["none"]]
    distilled = [r.last for r in results["diffkd"]]
    capped = not all(r.finished for runs in results.values() for r in runs)
    minutes, seconds = divmod(round(sum(wall_times)), 60)
    invocations = f" over {len(wall_times)} invocations" if len(wall_times) > 1 else ""
    title, metric, images = DEMO_LABELS[args.task]
    lines = [
        f"{title}: {metric} after the last epoch, on {results['none'][0].test_images} test {images}"
        + (" (runs stopped by --max-steps: smoke numbers)" if capped else ""),
        f"  teacher {args.teacher} ({args.demo_teacher_subset or 'all'} training {images}, {args.demo_teacher_epochs} "
        f"epoch(s)){' [cached]' if reused else ''}: {results['diffkd'][0].teacher:.2f}",
        f"  student {args.student} ({args.train_subset or 'all'} training {images}, {args.epochs} epochs), mean ± std "
        f"over seeds {', '.join(map(str, args.demo_seeds))}:",
        f"    alone        {_mean_spread(alone):>13}   per seed: {', '.join(f'{v:.2f}' for v in alone)}",
        f"    with DiffKD  {_mean_spread(distilled):>13}   per seed: {', '.join(f'{v:.2f}' for v in distilled)}",
        f"    difference   {statistics.mean(distilled) - statistics.mean(alone):>+13.2f}",
        f"  wall time {minutes} min {seconds:02d} s{invocations}; every run's log, summary.csv and plots are in "
        f"{folder}",
    ]
    return "\n".join(lines)
