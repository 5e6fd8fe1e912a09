"""Does DiffKD help detection and segmentation students?  A seeded study on fashion-scenes.

The setting is the dense demos' (configs/detection/demo.yaml, configs/segmentation/demo.yaml), shrunk so that the
whole study fits in about 45 minutes of one CPU core: 64-pixel scenes instead of 96, students trained for 4 epochs
on 320 scenes (80 steps of 16) instead of 8 on 500, tested on the first 200 test scenes after the last epoch.
Teachers are trained once on 2,000 scenes and kept in the work folder: RetinaNet ResNet-34-FPN (3 epochs, 64 FPN
channels) and DeepLabV3 MobileNetV3-Large (4 epochs).  Optimiser of the demos: AdamW lr 1e-3, cosine, 0.2 warm-up
epochs, weight decay 1e-4.  Loss weights are the library's defaults for each task (diffkd.methods; for detection
channel-normalised feature distances, see configs/detection/demo.yaml for the measurement behind them).

Methods: detection none (the student alone), mse (FitNet-style feature MSE on every FPN level) and diffkd (a
DiffKD head on every FPN level); segmentation none, kd (pixel-wise KL), dist (DIST per pixel) and diffkd (DiffKD on
the class-score map, DIST distance).  Seeds (``--seeds``, default 0–4) change the student's initialisation and the
training order; every method of a seed shares them, so differences are paired by seed.

Every run is ``python -m diffkd.train`` in a subprocess (``--jobs`` at a time, one thread each) with its own folder
under ``--work-dir``; a finished run is never redone and an interrupted one is resumed, so the study can be stopped
and restarted at any time, and the report covers whatever has finished.  The report: per task a table of the test
metric (mean ± std over seeds, per seed, and each method's paired difference from the student alone with a 95%
confidence interval from the t-distribution of the per-seed differences), the paired comparisons of DiffKD with
the other methods, and the loss balance — the distillation terms (the run's loss minus the task loss) divided by
the task loss, in the first and the last epoch — with a PNG chart and JSON.

    python benchmarks/bench_dense.py --jobs 1            # the full study: 2 teachers, 7 methods x 5 seeds
    python benchmarks/bench_dense.py --quick             # none and diffkd per task, 1 seed, 1 epoch on 64 scenes

Measured on the project's shared 2-core machine (niced, load 3–13 from other work): ``--quick`` 8 min wall (80 s of
CPU); the full study 2 teachers (18 and 22 min wall) and 35 student runs, detection and segmentation as two
``--jobs 1 --tasks ...`` processes at once: 57 and 35 min wall.  benchmarks/results/dense-fashion-scenes.md holds its
results.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_accuracy import (  # noqa: E402  (after the path set-up above)
    REPO, RESULTS, Runner, RunSpec, Study, Variant, _interval, _mean_std, exit_code, paired_difference, read_summary,
    report_meta, subprocess_runner)


@dataclass(frozen=True)
class DenseTask:
    name: str
    teacher: str
    student: str
    teacher_epochs: int
    metric: str            # the summary's val_<metric> is the study's number
    second_metric: str
    metric_label: str
    second_label: str
    task_loss: str         # the summary's train_<task_loss> is the task's own loss
    model_flags: tuple[str, ...] = ()


TASKS = {
    "detection": DenseTask("detection", "retinanet_resnet34_fpn", "retinanet_resnet18_fpn", 3, "map", "map50",
                           "box mAP@[.5:.95] (%)", "mAP@.5 (%)", "detection_loss", ("--fpn-channels", "64")),
    "segmentation": DenseTask("segmentation", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", 4,
                              "miou", "pixel_accuracy", "mIoU (%)", "pixel accuracy (%)", "ce_loss"),
}
METHODS = {
    "detection": {"none": "the student alone", "mse": "feature MSE on every FPN level (1×1 conv + BN)",
                  "diffkd": "DiffKD on every FPN level"},
    "segmentation": {"none": "the student alone", "kd": "pixel-wise KL (τ 1)", "dist": "DIST per pixel (τ 1)",
                     "diffkd": "DiffKD on the class-score map (DIST distance)"},
}
VARIANTS = {f"{task}-{method}": (task, Variant(f"{task}-{method}", ("--method", method), description))
            for task, methods in METHODS.items() for method, description in methods.items()}
BASELINE = "none"
# Paired comparisons beyond "each method vs the student alone": (task, better, worse).
COMPARISONS = [("detection", "diffkd", "mse"), ("segmentation", "diffkd", "dist"), ("segmentation", "diffkd", "kd")]
STUDY = {"dataset": "fashion-scenes", "image_size": 64, "batch_size": 16, "opt": "adamw", "lr": 0.001,
         "sched": "cosine", "warmup_epochs": 0.2, "weight_decay": 0.0001, "train_subset": 320, "epochs": 4,
         "val_subset": 200, "teacher_subset": 2000}
QUICK = {"methods": ("none", "diffkd"), "seeds": (0,), "train_subset": 64, "epochs": 1, "val_subset": 32,
         "teacher_subset": 64, "teacher_epochs": 1}


def training_argv(settings: Mapping, task: DenseTask, *, model: str, epochs: int, train_subset: int, seed: int,
                  runs_dir: Path, experiment: str, flags: Sequence[str]) -> list[str]:
    """``python -m diffkd.train`` arguments of a run of the study's recipe (one thread, tested after the last
    epoch)."""
    return ["--task", task.name, "--dataset", settings["dataset"], "--student", model, *task.model_flags,
            "--image-size", str(settings["image_size"]), "-b", str(settings["batch_size"]), "--opt", settings["opt"],
            "--lr", str(settings["lr"]), "--sched", settings["sched"], "--warmup-epochs",
            str(settings["warmup_epochs"]), "--weight-decay", str(settings["weight_decay"]), "--threads", "1",
            "--val-subset", str(settings["val_subset"]), "--train-subset", str(train_subset), "--epochs",
            str(epochs), "--eval-interval", str(epochs), "--seed", str(seed), "--output", str(runs_dir),
            "--experiment", experiment, *flags]


def finished_row(folder: Path, epochs: int, metric: str) -> dict | None:
    """The last epoch's summary row of a finished run (its test metric measured), else None."""
    rows = read_summary(folder)
    if rows and rows[-1].get("epoch") == str(epochs) and rows[-1].get(f"val_{metric}"):
        return rows[-1]
    return None


def loss_balance(row: Mapping[str, str], task: DenseTask) -> dict[str, float] | None:
    """How large the distillation terms of a summary row are against the task's own loss: ``all`` = (loss − task
    loss) / task loss, and ``kd`` = the heads' KD terms alone (the sum of every ``<head>/kd_loss``; the dense
    defaults weight them and the task loss 1), the part whose gradient reaches the student besides the task's."""
    if not row.get("train_loss") or not row.get(f"train_{task.task_loss}"):
        return None
    task_loss = float(row[f"train_{task.task_loss}"])
    kd = sum(float(value) for key, value in row.items() if key.endswith("/kd_loss") and value)
    return {"all": (float(row["train_loss"]) - task_loss) / task_loss, "kd": kd / task_loss}


class DenseStudy(Study):
    """The work folder of the study: its settings, a teacher per task, and one folder per run."""

    def _epochs(self, name: str) -> int:
        return self.settings["teacher_epochs"][name.split("-")[0]] if name.endswith("-teacher") \
            else self.settings["epochs"]

    def _finished(self, name: str) -> dict | None:
        return finished_row(self.runs_dir / name, self._epochs(name), TASKS[name.split("-")[0]].metric)

    def _complete(self, name: str, argv: list[str]) -> None:
        """Runs (or resumes) one run to its end; RuntimeError when it fails."""
        if self._finished(name) is not None:
            return
        folder = self.runs_dir / name
        if (folder / "last.pth").is_file():
            argv = argv + ["--resume", str(folder)]  # an interrupted run continues exactly where it stopped
        elif folder.exists():
            shutil.rmtree(folder)  # a run that stopped before its first checkpoint starts again
        log_path = self.work_dir / "logs" / f"{name}.txt"
        code = self.train(argv, log_path)
        if code != 0 or self._finished(name) is None:
            raise RuntimeError(f"run {name} failed (exit code {code}); see {log_path}")

    def dense_teacher(self, task: DenseTask) -> Path:
        """The task's teacher weight file, trained once (and exported) when missing."""
        path = self.work_dir / f"{task.name}-teacher.pth"
        if path.is_file():
            return path
        name = f"{task.name}-teacher"
        epochs = self.settings["teacher_epochs"][task.name]
        self.log(f"teacher {task.teacher}: training it once ({self.settings['teacher_subset']} scenes, {epochs} "
                 f"epochs); kept as {path}")
        self._complete(name, training_argv(self.settings, task, model=task.teacher, epochs=epochs,
                                           train_subset=self.settings["teacher_subset"], seed=0,
                                           runs_dir=self.runs_dir, experiment=name, flags=("--method", "none")))
        log_path = self.work_dir / "logs" / f"{name}-export.txt"
        if self.evaluate([str(self.runs_dir / name / "last.pth"), "--export", str(path), "--no-eval"],
                         log_path) != 0 or not path.is_file():
            raise RuntimeError(f"exporting the {task.name} teacher failed; see {log_path}")
        return path

    def student_argv(self, spec: RunSpec, teacher: Path | None) -> list[str]:
        task = TASKS[VARIANTS[spec.variant.name][0]]
        flags = list(spec.variant.flags)
        if spec.variant.method != "none":
            flags += ["--teacher", task.teacher, "--teacher-ckpt", str(teacher)]
        return training_argv(self.settings, task, model=task.student, epochs=self.settings["epochs"],
                             train_subset=self.settings["train_subset"], seed=spec.seed, runs_dir=self.runs_dir,
                             experiment=spec.name, flags=flags)

    def run(self, specs: Sequence[RunSpec], jobs: int = 1) -> list[str]:
        """Runs the unfinished ``specs`` in order, ``jobs`` at a time; returns the failures (the others still run)."""
        todo = [spec for spec in specs if self._finished(spec.name) is None]
        self.log(f"{len(specs) - len(todo)} of {len(specs)} selected runs already finished; {len(todo)} to run")
        teachers = {}
        for name in dict.fromkeys(VARIANTS[s.variant.name][0] for s in todo if s.variant.method != "none"):
            teachers[name] = self.dense_teacher(TASKS[name])
        failures, started = [], time.monotonic()

        def one(spec: RunSpec) -> None:
            self._complete(spec.name, self.student_argv(spec, teachers.get(VARIANTS[spec.variant.name][0])))

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(one, spec): spec for spec in todo}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                try:
                    future.result()
                    status = "done"
                except RuntimeError as error:
                    failures.append(str(error))
                    status = f"FAILED: {error}"
                self.log(f"[{done}/{len(todo)}, {time.monotonic() - started:.0f} s] {futures[future].name} {status}")
        return failures

    def dense_results(self) -> dict[str, dict[int, list[dict]]]:
        """variant name → seed → every epoch's summary row, for every finished run of a known variant."""
        table: dict[str, dict[int, list[dict]]] = {}
        for name in VARIANTS:
            for folder in sorted(self.runs_dir.glob(f"{name}-seed*")):
                seed = folder.name.rpartition("-seed")[2]
                if seed.isdigit() and self._finished(folder.name) is not None:
                    table.setdefault(name, {})[int(seed)] = read_summary(folder)
        return {name: dict(sorted(table[name].items())) for name in VARIANTS if name in table}

    def teacher_metric(self, task: DenseTask) -> float | None:
        row = self._finished(f"{task.name}-teacher")
        return float(row[f"val_{task.metric}"]) if row else None


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _statistics(values: Mapping[int, float]) -> dict:
    numbers = list(values.values())
    return {"per_seed": dict(values), "mean": statistics.mean(numbers),
            "std": statistics.stdev(numbers) if len(numbers) > 1 else math.nan}


def summarise(results: Mapping[str, Mapping[int, list[dict]]]) -> dict:
    """Per variant: the metrics per seed, mean and std, the paired difference from the student alone, and the loss
    balance in the first and last epoch; and the paired comparisons."""
    metric = {}
    variants = {}
    for name, runs in results.items():
        task = TASKS[VARIANTS[name][0]]
        values = {key: {seed: float(rows[-1][f"val_{key}"]) for seed, rows in runs.items()}
                  for key in (task.metric, task.second_metric)}
        metric[name] = values[task.metric]
        balance = {when: [b for rows in runs.values() if (b := loss_balance(rows[index], task)) is not None]
                   for when, index in (("first_epoch", 0), ("last_epoch", -1))}
        variants[name] = {"task": task.name, "description": VARIANTS[name][1].description,
                          **{key: _statistics(v) for key, v in values.items()},
                          "loss_balance": {when: {kind: statistics.mean(b[kind] for b in v) for kind in v[0]}
                                           for when, v in balance.items() if v}}
    for name, entry in variants.items():
        baseline = f"{entry['task']}-{BASELINE}"
        difference = paired_difference(metric[name], metric[baseline]) \
            if name != baseline and baseline in metric else None
        entry["vs_none"] = asdict(difference) if difference else None
    comparisons = []
    for task, better, worse in COMPARISONS:
        a, b = f"{task}-{better}", f"{task}-{worse}"
        if a in metric and b in metric and (difference := paired_difference(metric[a], metric[b])):
            comparisons.append({"task": task, "better": a, "worse": b, **asdict(difference)})
    return {"variants": variants, "comparisons": comparisons}


def render_markdown(summary: Mapping, settings: Mapping, meta: Mapping) -> str:
    variants = summary["variants"]
    lines = [f"# DiffKD on dense tasks: a seeded study on fashion-scenes ({meta['date']})", "",
             f"{settings['image_size']}-pixel scenes; students trained for {settings['epochs']} epochs on "
             f"{settings['train_subset']} scenes (batch {settings['batch_size']}, {settings['opt']} lr "
             f"{settings['lr']:g}, {settings['sched']}), tested on the first {settings['val_subset']} test scenes "
             f"after the last epoch; teachers trained once on {settings['teacher_subset']} scenes. Shrunk from the "
             f"demos (96-pixel scenes, 8 epochs on 500) to fit about 45 minutes of one CPU core: small, short runs "
             f"from random weights, not the paper's COCO or Cityscapes setting. Δ: the paired (seed-matched) "
             f"difference with its 95% confidence interval (t-distribution of the per-seed differences); "
             f"\"excludes 0\" marks a difference beyond the seed noise. Written by `python benchmarks/bench_dense.py "
             f"{meta['command']}`.{' ' + meta['note'] if meta['note'] else ''}", ""]
    for task in TASKS.values():
        names = [n for n, v in variants.items() if v["task"] == task.name]
        if not names:
            continue
        teacher = meta["teachers"].get(task.name)
        lines += [f"## {task.name.capitalize()}: {task.teacher} → {task.student}", "",
                  f"Teacher test {task.metric_label.split(' (')[0]}: "
                  f"{'not measured' if teacher is None else f'{teacher:.2f}'}.", "",
                  f"| method | seeds | {task.metric_label} mean ± std | per seed | Δ vs the student alone [95% CI] | "
                  f"{task.second_label} mean ± std |", "| --- | --- | --- | --- | --- | --- |"]
        for name in names:
            v = variants[name]
            first, second = v[task.metric], v[task.second_metric]
            per_seed = ", ".join(f"{value:.2f}" for value in first["per_seed"].values())
            vs = "baseline" if name.endswith(f"-{BASELINE}") else _interval(v["vs_none"])
            lines.append(f"| {name.split('-', 1)[1]}: {v['description']} | {len(first['per_seed'])} | "
                         f"{_mean_std(first)} | {per_seed} | {vs} | {_mean_std(second)} |")
        lines.append("")
    if summary["comparisons"]:
        lines += ["## DiffKD against the other methods (paired over the common seeds)", "",
                  "| comparison | seeds | Δ [95% CI] |", "| --- | --- | --- |"]
        lines += [f"| {c['better']} − {c['worse']} | {len(c['seeds'])} | {_interval(c)} |"
                  for c in summary["comparisons"]]
        lines.append("")
    balanced = [(n, v["loss_balance"]) for n, v in variants.items() if v["loss_balance"] and
                not n.endswith(f"-{BASELINE}")]
    if balanced:
        lines += ["## Loss balance: distillation terms / task loss (training batches, mean over seeds)", "",
                  "All terms: the run's weighted loss minus the task's own loss (detection: the detector's losses; "
                  "segmentation: the cross-entropy), divided by that task loss, averaged over an epoch. KD terms: "
                  "the heads' KD losses alone (weight 1), without DiffKD's diffusion loss, which trains the "
                  "denoiser on the teacher's features and sends no gradient to the student.", "",
                  "| method | epoch 1: all terms | epoch 1: KD terms | last epoch: all terms | last epoch: KD terms |",
                  "| --- | --- | --- | --- | --- |"]
        nan = {"all": math.nan, "kd": math.nan}
        lines += [f"| {n} | " + " | ".join(f"{b.get(when, nan)[kind]:.2f}" for when in ("first_epoch", "last_epoch")
                                         for kind in ("all", "kd")) + " |" for n, b in balanced]
        lines.append("")
    return "\n".join(lines)


def plot_summary(summary: Mapping, path: Path) -> Path:
    """One row per task: the metric per seed and mean ± std per method (left), the paired difference from the
    student alone with its 95% CI (right)."""
    from diffkd.plots import draw_seed_comparison, plt

    variants = summary["variants"]
    tasks = [task for task in TASKS.values() if any(v["task"] == task.name for v in variants.values())]
    figure, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), dpi=100, squeeze=False,
                                gridspec_kw={"width_ratios": [3, 2]})
    for (left, right), task in zip(axes, tasks):
        names = [n for n, v in variants.items() if v["task"] == task.name]
        draw_seed_comparison(left, {n.split("-", 1)[1]: list(variants[n][task.metric]["per_seed"].items())
                                    for n in names}, ylabel=f"test {task.metric_label}")
        left.set_ylim(bottom=0)  # from 0: the differences are drawn to scale on the right
        left.set_title(f"{task.name}: {task.teacher} → {task.student}", fontsize="medium")
        compared = [n for n in names if variants[n]["vs_none"]]
        for position, name in enumerate(compared):
            d = variants[name]["vs_none"]
            excludes = d["low"] > 0 or d["high"] < 0
            colour = ("tab:green" if d["mean"] > 0 else "tab:red") if excludes else "tab:grey"
            right.bar(position, d["mean"], color=colour, alpha=0.7)
            if not math.isnan(d["low"]):
                right.errorbar(position, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                               color="black", capsize=5)
        right.axhline(0, color="black", linewidth=0.8)
        right.set_xticks(range(len(compared)), [n.split("-", 1)[1] for n in compared])
        right.set_xlim(-0.7, max(len(compared), 1) - 0.3)
        right.set_ylabel(f"Δ {task.metric_label.split(' (')[0]} vs alone (paired, 95% CI)")
        right.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(study: DenseStudy, out_prefix: Path, meta: dict) -> dict:
    """The markdown tables, PNG chart and JSON of every finished run; returns the summary."""
    results = study.dense_results()
    if not results:
        raise ValueError(f"no finished run in {study.runs_dir} to report on")
    summary = summarise(results)
    meta["teachers"] = {task.name: study.teacher_metric(task) for task in TASKS.values()}
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(summary, study.settings, meta)
    out_prefix.with_suffix(".md").write_text(markdown)
    plot_summary(summary, out_prefix.with_suffix(".png"))
    payload = {"meta": meta, "settings": study.settings, **summary,
               "runs": {name: {str(seed): rows[-1] for seed, rows in runs.items()} for name, runs in results.items()}}
    out_prefix.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(markdown, flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS), help="default: both")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)), help="student seeds (default 0–4)")
    parser.add_argument("--quick", action="store_true",
                        help="none and diffkd per task, seed 0, 1 epoch on 64 scenes, teachers 1 epoch on 64 scenes, "
                             "in their own work folder and report: checks the pipeline, measures nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (default 1)")
    parser.add_argument("--work-dir", type=Path, help="runs and teachers (default: output/bench-dense, or "
                                                      "output/bench-dense-quick with --quick)")
    parser.add_argument("--out", type=Path, help="report files without suffix (default: benchmarks/results/"
                                                 "dense-fashion-scenes[-quick]); .md, .png and .json are written")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the finished runs")
    parser.add_argument("--note", default="", help="a line recorded in the report")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    suffix = "-quick" if args.quick else ""
    args.work_dir = args.work_dir or REPO / "output" / f"bench-dense{suffix}"
    args.out = args.out or RESULTS / f"dense-fashion-scenes{suffix}"
    return args


def study_settings(quick: bool) -> dict:
    settings = {**STUDY, "teacher_epochs": {task.name: task.teacher_epochs for task in TASKS.values()}}
    if quick:
        settings.update({key: QUICK[key] for key in ("train_subset", "epochs", "val_subset", "teacher_subset")})
        settings["teacher_epochs"] = {name: QUICK["teacher_epochs"] for name in TASKS}
    return settings


def selected_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Seed by seed, so that an interrupted study has whole seeds (every method) to pair."""
    return [RunSpec(variant, seed) for seed in args.seeds for task, variant in VARIANTS.values()
            if task in args.tasks and (not args.quick or variant.method in QUICK["methods"])]


def main(argv: Sequence[str] | None = None, *, train: Runner | None = None, evaluate: Runner | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.seeds = list(QUICK["seeds"])
    try:
        study = DenseStudy(args.work_dir, study_settings(args.quick), train=train or subprocess_runner("diffkd.train"),
                           evaluate=evaluate or subprocess_runner("diffkd.eval"))
        failures = [] if args.report_only else study.run(selected_runs(args), args.jobs)
        write_report(study, args.out, report_meta(args, argv))
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return exit_code(failures)


if __name__ == "__main__":
    sys.exit(main())
