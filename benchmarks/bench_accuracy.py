"""Does distillation with DiffKD help, and which of the paper's trends show?  A seeded study on Fashion-MNIST.

The setting is the demo's (README, "The demo"): a resnet14 teacher trained for one epoch on 24,000 Fashion-MNIST
images (trained once by this script and kept in its work folder, or given with --teacher-ckpt), and a resnet8
student trained for 5 epochs on a class-balanced subset of 2,000 images (batch 64, SGD lr 0.1, cosine, weight
decay 5e-4; each seed draws its own subset, shared by every method of that seed).  Test top-1 is measured on all
10,000 test images after the last epoch.  Loss weights are the CIFAR-100 column of the paper's recipes (KD: CE 0.1
+ KL 0.9 at τ 4; DIST: CE 1 + DIST 2 at τ 4; MSE: CE 1 + feature MSE 1; DiffKD: CE 1 + per head KD + diffusion
loss, feature and logit heads, NFE 5, no autoencoder).

Why this setting: short pilots (none, kd and diffkd over 3 seeds) set it against a harder one, 1,000 training
images for 10 epochs.  There the student alone moved by 3.1 points between two seeds (74.76 and 71.69, against
72.84, 72.72 and 73.53 here), which would drown differences of a point; resnet8 is already the zoo's smallest
model.  Ten seeds for the methods make the paired 95% interval about ±0.7 standard deviations of the per-seed
differences wide (t(0.975, 9)/√10).

Methods (``--methods``): none (the student alone), kd, dist, mse, diffkd, over ``--seeds`` (default 0–9).
DiffKD ablations (``--ablations``, over ``--ablation-seeds``, default 0–4): without adaptive noise matching
(no-anm), NFE 1 / 2 / 10 (NFE 5 is diffkd itself), the feature head or the logit head alone, and a 32-channel
autoencoder on the feature head (ae32, half the teacher's 64 channels, the official module's default width).

Every run is ``python -m diffkd.train`` in a subprocess (``--jobs`` at a time, one thread each) with its own folder
under ``--work-dir``; a finished run (its summary.csv has the last epoch's test accuracy) is never redone, and an
interrupted one is resumed.  The report covers every finished run in the work folder: a markdown table (mean ± std
over seeds, and each variant's difference from KD with a paired, seed-matched 95% confidence interval from the
t-distribution of the per-seed differences), the paper's ablation trends as paired comparisons, what the DiffKD
heads did (γ and the relative error to the teacher before and after denoising, last epoch), a PNG chart and JSON.

    python benchmarks/bench_accuracy.py --jobs 2                     # the full study (85 runs)
    python benchmarks/bench_accuracy.py --quick --jobs 2             # none, kd, diffkd over 2 seeds

With the teacher trained, ``--quick --jobs 2`` took 2 min 10 s on a 2-core machine, and the full study's 85 runs
70 min one at a time on a busy shared one (about half that with ``--jobs 2`` on two free cores, from the runs'
CPU times).  benchmarks/results/accuracy-fashion-mnist.md holds its results.
    python benchmarks/bench_accuracy.py --methods kd,diffkd --seeds 0 1 2 --ablations none
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The demo's teacher and student recipe (configs/demo.yaml).
STUDY = {"dataset": "fashion-mnist", "teacher": "resnet14", "student": "resnet8", "train_subset": 2000,
         "epochs": 5, "batch_size": 64, "lr": 0.1, "sched": "cosine", "weight_decay": 5e-4}
TEACHER_RECIPE = {"epochs": 1, "train_subset": 24000, "seed": 0}


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]
    description: str

    @property
    def method(self) -> str:
        return self.flags[self.flags.index("--method") + 1]


METHODS = {
    "none": Variant("none", ("--method", "none"), "the student alone"),
    "kd": Variant("kd", ("--method", "kd"), "KD (KL on logits, τ 4)"),
    "dist": Variant("dist", ("--method", "dist"), "DIST (τ 4)"),
    "mse": Variant("mse", ("--method", "mse"), "feature MSE through 1×1 conv + BN"),
    "diffkd": Variant("diffkd", ("--method", "diffkd"), "DiffKD, feature + logit heads, NFE 5"),
}
ABLATIONS = {
    "no-anm": Variant("diffkd-no-anm", ("--method", "diffkd", "--no-anm"), "DiffKD without noise matching"),
    "nfe1": Variant("diffkd-nfe1", ("--method", "diffkd", "--nfe", "1"), "DiffKD, NFE 1"),
    "nfe2": Variant("diffkd-nfe2", ("--method", "diffkd", "--nfe", "2"), "DiffKD, NFE 2"),
    "nfe10": Variant("diffkd-nfe10", ("--method", "diffkd", "--nfe", "10"), "DiffKD, NFE 10"),
    "feature": Variant("diffkd-feature", ("--method", "diffkd", "--heads", "feature"), "DiffKD, feature head only"),
    "logit": Variant("diffkd-logit", ("--method", "diffkd", "--heads", "logit"), "DiffKD, logit head only"),
    "ae32": Variant("diffkd-ae32", ("--method", "diffkd", "--ae-channels", "32"),
                    "DiffKD, 32-channel autoencoder on the feature head"),
}
VARIANTS = {v.name: v for v in (*METHODS.values(), *ABLATIONS.values())}
BASELINE = "kd"
# The paper's claims and ablation trends, as paired comparisons (better, worse, what the paper reports).
TRENDS = [
    ("diffkd", "none", "DiffKD helps the student (paper, ResNet-50 → MobileNetV1: 73.62 vs 70.13)"),
    ("diffkd", "mse", "DiffKD beats plain feature MSE (paper: 73.62 vs 72.39)"),
    ("diffkd-feature", "mse", "the DiffKD feature head beats plain feature MSE on the same feature (paper: 73.16 "
                              "vs 72.39)"),
    ("diffkd", "diffkd-no-anm", "adaptive noise matching helps (paper: 73.62 vs 73.34)"),
    ("diffkd", "diffkd-nfe1", "NFE 5 beats NFE 1 (paper: 73.62 vs 73.36)"),
    ("diffkd-nfe10", "diffkd-nfe1", "NFE 10 beats NFE 1 (paper: 73.58 vs 73.36)"),
    ("diffkd-nfe2", "diffkd-nfe1", "NFE 2 vs NFE 1 (the paper has no NFE 2)"),
    ("diffkd-feature", "none", "the feature head alone helps (paper: 73.16 vs 70.13)"),
    ("diffkd-logit", "none", "the logit head alone helps (paper: 72.89 vs 70.13)"),
    ("diffkd", "diffkd-feature", "both heads beat the feature head alone (paper: 73.62 vs 73.16)"),
    ("diffkd", "diffkd-logit", "both heads beat the logit head alone (paper: 73.62 vs 72.89)"),
    ("diffkd-ae32", "diffkd", "an autoencoder on the feature head (paper, at ImageNet scale: 73.62 with, 73.47 "
                              "without)"),
]
QUICK = {"methods": ("none", "kd", "diffkd"), "seeds": (0, 1), "ablations": ()}
DIAGNOSTIC_TERMS = ("gamma", "gamma_std", "rel_error_before", "rel_error_after")


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast below this point
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class PairedDifference:
    """better − worse over the seeds both have: mean, standard deviation and 95% confidence interval."""
    seeds: tuple[int, ...]
    mean: float
    std: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(better: Mapping[int, float], worse: Mapping[int, float],
                      confidence: float = 0.95) -> PairedDifference | None:
    """The seed-matched difference ``better − worse`` with a t-interval; None without a common seed.  With a
    single common seed the interval is unbounded (NaN)."""
    seeds = tuple(sorted(set(better) & set(worse)))
    if not seeds:
        return None
    differences = [better[s] - worse[s] for s in seeds]
    mean = statistics.mean(differences)
    if len(seeds) < 2:
        return PairedDifference(seeds, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(differences)
    half_width = t_quantile(0.5 + confidence / 2, len(seeds) - 1) * std / math.sqrt(len(seeds))
    return PairedDifference(seeds, mean, std, mean - half_width, mean + half_width)


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"


def read_summary(folder: Path) -> list[dict]:
    path = folder / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def finished_row(folder: Path, epochs: int) -> dict | None:
    """The last epoch's summary row of a finished run (its test accuracy measured), else None."""
    rows = read_summary(folder)
    if rows and rows[-1].get("epoch") == str(epochs) and rows[-1].get("val_top1"):
        return rows[-1]
    return None


def training_argv(study: Mapping, *, model: str, epochs: int, train_subset: int, seed: int, runs_dir: Path,
                  experiment: str, flags: Sequence[str] = ()) -> list[str]:
    """``python -m diffkd.train`` arguments of a run of the study's recipe (one thread, tested after the last
    epoch)."""
    argv = ["--dataset", study["dataset"], "--student", model, "--epochs", str(epochs), "-b", str(study["batch_size"]),
            "--lr", str(study["lr"]), "--sched", study["sched"], "--weight-decay", str(study["weight_decay"]),
            "--train-subset", str(train_subset), "--eval-interval", str(epochs), "--threads", "1",
            "--seed", str(seed), "--output", str(runs_dir), "--experiment", experiment, *flags]
    if study.get("data_dir"):
        argv += ["--data-dir", study["data_dir"]]
    return argv


def run_argv(study: Mapping, spec: RunSpec, runs_dir: Path, teacher_ckpt: Path | None) -> list[str]:
    """The arguments of one student run of the study."""
    argv = training_argv(study, model=study["student"], epochs=study["epochs"], train_subset=study["train_subset"],
                         seed=spec.seed, runs_dir=runs_dir, experiment=spec.name, flags=spec.variant.flags)
    if spec.variant.method != "none":
        argv += ["--teacher", study["teacher"], "--teacher-ckpt", str(teacher_ckpt)]
    return argv


Runner = Callable[[Sequence[str], Path], int]  # (arguments of a diffkd command, log file) -> exit code


def subprocess_runner(module: str = "diffkd.train") -> Runner:
    """Runs ``python -m <module> ARGS`` with one OpenMP thread, its output into the log file."""
    def run(argv: Sequence[str], log_path: Path) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            return subprocess.run([sys.executable, "-m", module, *argv], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=os.getcwd()).returncode
    return run


class Study:
    """The work folder of a study: its settings, the teacher, and one folder per run."""

    def __init__(self, work_dir: Path, settings: Mapping, *, train: Runner, evaluate: Runner,
                 log: Callable[[str], None] = print):
        self.work_dir, self.settings, self.log = Path(work_dir), dict(settings), log
        self.runs_dir = self.work_dir / "runs"
        self.train, self.evaluate = train, evaluate
        self._check_settings()

    def _check_settings(self) -> None:
        path = self.work_dir / "study.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            if changed:
                differences = "; ".join(f"{k}: saved {saved.get(k)!r}, asked {self.settings.get(k)!r}" for k in changed)
                raise ValueError(f"the work folder {self.work_dir} holds runs of other settings ({differences}); "
                                 f"pass another --work-dir for a new study")
        else:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.settings, indent=1) + "\n")

    def teacher(self, given: Path | None) -> Path:
        """The teacher's weight file: ``given``, or the one this study trained (trained now if missing)."""
        if given is not None:
            if not given.is_file():
                raise ValueError(f"--teacher-ckpt {given} does not exist")
            return given
        path = self.work_dir / "teacher.pth"
        if path.is_file():
            return path
        folder = self.runs_dir / "teacher"
        argv = training_argv(self.settings, model=self.settings["teacher"], epochs=TEACHER_RECIPE["epochs"],
                             train_subset=TEACHER_RECIPE["train_subset"], seed=TEACHER_RECIPE["seed"],
                             runs_dir=self.runs_dir, experiment="teacher", flags=("--method", "none"))
        self.log(f"teacher {self.settings['teacher']}: training it once ({TEACHER_RECIPE['train_subset']} images, "
                 f"{TEACHER_RECIPE['epochs']} epoch); kept as {path}")
        self._run_to_completion(folder, argv, TEACHER_RECIPE["epochs"], "the teacher")
        if self.evaluate([str(folder / "last.pth"), "--export", str(path), "--no-eval"],
                         self.work_dir / "logs" / "teacher-export.txt") != 0 or not path.is_file():
            raise RuntimeError(f"exporting the teacher failed; see {self.work_dir / 'logs' / 'teacher-export.txt'}")
        return path

    def _run_to_completion(self, folder: Path, argv: list[str], epochs: int, what: str) -> None:
        if finished_row(folder, epochs) is not None:
            return
        if (folder / "last.pth").is_file():
            argv = argv + ["--resume", str(folder)]  # an interrupted run continues exactly where it stopped
        elif folder.exists():
            shutil.rmtree(folder)  # a run that stopped before its first checkpoint starts again
        log_path = self.work_dir / "logs" / f"{folder.name}.txt"
        code = self.train(argv, log_path)
        if code != 0 or finished_row(folder, epochs) is None:
            raise RuntimeError(f"{what} failed (exit code {code}); see {log_path}")

    def pending(self, specs: Sequence[RunSpec]) -> list[RunSpec]:
        return [s for s in specs if finished_row(self.runs_dir / s.name, self.settings["epochs"]) is None]

    def run(self, specs: Sequence[RunSpec], teacher_ckpt: Path | None, jobs: int = 1) -> list[str]:
        """Runs the unfinished ``specs``, ``jobs`` at a time; returns the failures (the others still run)."""
        todo = self.pending(specs)
        self.log(f"{len(specs) - len(todo)} of {len(specs)} selected runs already finished; {len(todo)} to run")
        if not todo:
            return []
        needs_teacher = any(s.variant.method != "none" for s in todo)
        teacher = self.teacher(teacher_ckpt) if needs_teacher else None
        failures = []
        started = time.monotonic()

        def one(spec: RunSpec) -> None:
            self._run_to_completion(self.runs_dir / spec.name, run_argv(self.settings, spec, self.runs_dir, teacher),
                                    self.settings["epochs"], f"run {spec.name}")

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(one, spec): spec for spec in todo}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                spec = futures[future]
                try:
                    future.result()
                    status = "done"
                except RuntimeError as error:
                    failures.append(str(error))
                    status = f"FAILED: {error}"
                self.log(f"[{done}/{len(todo)}, {time.monotonic() - started:.0f} s] {spec.name} {status}")
        return failures

    def teacher_top1(self) -> str:
        """The teacher's test top-1 as the distillation runs measured it before training (their log.txt)."""
        for folder in sorted(self.runs_dir.glob("*-seed*")):
            log = folder / "log.txt"
            match = re.search(r"^teacher \S+: top-1 ([0-9.]+)%", log.read_text() if log.is_file() else "", re.M)
            if match:
                return match.group(1)
        return "not measured"

    def results(self) -> dict[str, dict[int, dict]]:
        """variant name → seed → the last epoch's summary row, for every finished run of a known variant."""
        table: dict[str, dict[int, dict]] = {}
        if not self.runs_dir.is_dir():
            return table
        for folder in sorted(self.runs_dir.iterdir()):
            variant, _, seed = folder.name.rpartition("-seed")
            row = finished_row(folder, self.settings["epochs"])
            if variant in VARIANTS and seed.isdigit() and row is not None:
                table.setdefault(variant, {})[int(seed)] = row
        return {name: dict(sorted(table[name].items())) for name in VARIANTS if name in table}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _top1(rows: Mapping[int, dict]) -> dict[int, float]:
    return {seed: float(row["val_top1"]) for seed, row in rows.items()}


def _diagnostics(rows: Mapping[int, dict]) -> dict[str, float]:
    """Mean over seeds of each DiffKD head's last-epoch diagnostics (γ, relative errors)."""
    out = {}
    for head in ("feature", "logit"):
        for term in DIAGNOSTIC_TERMS:
            values = [float(r[f"train_{head}/{term}"]) for r in rows.values() if r.get(f"train_{head}/{term}")]
            if values:
                out[f"{head}/{term}"] = statistics.mean(values)
    return out


def summarise(results: Mapping[str, Mapping[int, dict]]) -> dict:
    """Per variant: per-seed top-1, mean, std, diagnostics and the paired difference from KD; and the trends."""
    top1 = {name: _top1(rows) for name, rows in results.items()}
    variants = {}
    for name, values in top1.items():
        numbers = list(values.values())
        difference = paired_difference(values, top1[BASELINE]) if name != BASELINE and BASELINE in top1 else None
        variants[name] = {"description": VARIANTS[name].description, "top1": values,
                          "mean": statistics.mean(numbers),
                          "std": statistics.stdev(numbers) if len(numbers) > 1 else math.nan,
                          "vs_kd": asdict(difference) if difference else None,
                          "diagnostics": _diagnostics(results[name])}
    trends = []
    for better, worse, claim in TRENDS:
        if better in top1 and worse in top1:
            difference = paired_difference(top1[better], top1[worse])
            if difference is not None:
                trends.append({"better": better, "worse": worse, "claim": claim, **asdict(difference)})
    return {"variants": variants, "trends": trends}


def _interval(d: Mapping | None) -> str:
    if d is None:
        return "–"
    if math.isnan(d["low"]):
        return f"{d['mean']:+.2f} (1 seed, no interval)"
    beyond_noise = " (excludes 0)" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{beyond_noise}"


def _mean_std(v: Mapping) -> str:
    return f"{v['mean']:.2f}" + ("" if math.isnan(v["std"]) else f" ± {v['std']:.2f}")


def render_markdown(summary: Mapping, settings: Mapping, meta: Mapping) -> str:
    variants = summary["variants"]
    lines = [f"# DiffKD accuracy study on Fashion-MNIST ({meta['date']})", "",
             f"Teacher {settings['teacher']} (one epoch on {TEACHER_RECIPE['train_subset']} images, test top-1 "
             f"{meta.get('teacher_top1', 'n/a')}); student {settings['student']} trained for {settings['epochs']} "
             f"epochs on {settings['train_subset']} images (each seed its own class-balanced subset, shared by the "
             f"methods). Test top-1 (%) after the last epoch on the 10,000 test images. Δ vs KD: the paired "
             f"(seed-matched) difference with its 95% confidence interval (t-distribution of the per-seed "
             f"differences); \"excludes 0\" marks a difference beyond the seed noise. Why this setting: the "
             f"docstring of benchmarks/bench_accuracy.py (a pilot with 1,000 training images was far noisier). "
             f"Report written by `python benchmarks/bench_accuracy.py {meta['command']}`."
             f"{' ' + meta['note'] if meta['note'] else ''}", ""]

    def table(names: Sequence[str], title: str) -> None:
        rows = [n for n in names if n in variants]
        if not rows:
            return
        lines.extend([f"## {title}", "", "| variant | seeds | top-1 mean ± std | per seed | Δ vs KD [95% CI] |",
                      "| --- | --- | --- | --- | --- |"])
        for name in rows:
            v = variants[name]
            per_seed = ", ".join(f"{value:.2f}" for value in v["top1"].values())
            lines.append(f"| {name}: {v['description']} | {len(v['top1'])} | {_mean_std(v)} | {per_seed} | "
                         f"{_interval(v['vs_kd']) if name != BASELINE else 'baseline'} |")
        lines.append("")

    table([v.name for v in METHODS.values()], "Methods")
    table([v.name for v in ABLATIONS.values()], "DiffKD ablations")
    if summary["trends"]:
        lines.extend(["## The paper's claims and ablation trends (paired differences over the common seeds)", "",
                      "| claim | comparison | seeds | Δ top-1 [95% CI] |", "| --- | --- | --- | --- |"])
        lines += [f"| {t['claim']} | {t['better']} − {t['worse']} | {len(t['seeds'])} | {_interval(t)} |"
                  for t in summary["trends"]]
        lines.append("")
    diffkd_rows = [(n, v["diagnostics"]) for n, v in variants.items() if v["diagnostics"]]
    if diffkd_rows:
        lines.extend(["## What the DiffKD heads did (last epoch, training batches, mean over seeds)", "",
                      "γ: the noise adapter's weight of the student feature (1 = no noise added; spread = its std "
                      "over a batch). Relative error: Σ‖Z − Z_t‖² / Σ‖Z_t‖² of the student feature before "
                      "denoising and of the denoised one (after the chain and proj).", "",
                      "| variant | feature γ (spread) | feature rel. error before → after | logit γ (spread) | "
                      "logit rel. error before → after |", "| --- | --- | --- | --- | --- |"])

        def head_cells(d: Mapping, head: str) -> list[str]:
            if f"{head}/gamma" not in d:
                return ["–", "–"]
            before, after = (d.get(f"{head}/rel_error_{when}", math.nan) for when in ("before", "after"))
            spread = f" ({d[f'{head}/gamma_std']:.3f})" if f"{head}/gamma_std" in d else ""
            return [f"{d[f'{head}/gamma']:.3f}{spread}",
                    f"{before:.3f} → {after:.3f}"]

        lines += ["| " + " | ".join([name, *head_cells(d, "feature"), *head_cells(d, "logit")]) + " |"
                  for name, d in diffkd_rows]
        lines.append("")
    return "\n".join(lines)


def plot_summary(summary: Mapping, path: Path, title: str) -> Path:
    """Left: top-1 per seed and mean ± std per variant; right: the paired difference from KD with its 95% CI."""
    from diffkd.plots import draw_seed_comparison, plt

    variants = summary["variants"]
    names = list(variants)
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(10.0, 1.1 * len(names) + 4), 4.8), dpi=100,
                                         gridspec_kw={"width_ratios": [3, 2]})
    draw_seed_comparison(left, {n: list(variants[n]["top1"].items()) for n in names})
    compared = [n for n in names if variants[n]["vs_kd"]]
    for position, name in enumerate(compared):
        d = variants[name]["vs_kd"]
        excludes = d["low"] > 0 or d["high"] < 0
        color = ("tab:green" if d["mean"] > 0 else "tab:red") if excludes else "tab:grey"
        error = None if math.isnan(d["low"]) else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
        right.bar(position, d["mean"], color=color, alpha=0.7)
        if error is not None:
            right.errorbar(position, d["mean"], yerr=error, color="black", capsize=5)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(range(len(compared)), compared, rotation=30, ha="right")
    right.set_ylabel(f"top-1 − {BASELINE} top-1 (paired, 95% CI)")
    right.grid(axis="y", alpha=0.3)
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, metadata={"Title": title})
    plt.close(figure)
    return path


def write_report(study: Study, out_prefix: Path, meta: dict) -> dict:
    """The markdown table, PNG chart and JSON of every finished run; returns the summary."""
    results = study.results()
    if not results:
        raise ValueError(f"no finished run in {study.runs_dir} to report on")
    summary = summarise(results)
    meta["teacher_top1"] = study.teacher_top1()
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(summary, study.settings, meta)
    out_prefix.with_suffix(".md").write_text(markdown)
    plot_summary(summary, out_prefix.with_suffix(".png"),
                 f"Fashion-MNIST, {study.settings['teacher']} → {study.settings['student']}: test top-1 per seed")
    payload = {"meta": meta, "settings": study.settings, "teacher_recipe": TEACHER_RECIPE, **summary,
               "runs": {name: {str(seed): row for seed, row in rows.items()} for name, rows in results.items()}}
    out_prefix.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(markdown, flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _names(text: str, known: Sequence[str], flag: str) -> tuple[str, ...]:
    if text.strip() in ("", "none") and flag == "--ablations":
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from "
                                         f"{', '.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="seeds of the methods")
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help=f"comma-separated, from {', '.join(ABLATIONS)}, or none (default: all)")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=list(range(5)),
                        help="seeds of the ablations")
    parser.add_argument("--quick", action="store_true",
                        help="none, kd and diffkd over seeds 0 and 1, no ablations, in their own work folder and "
                             "report (about 5 minutes on 2 cores with the teacher trained)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (default 1)")
    parser.add_argument("--work-dir", type=Path, help="runs and the teacher (default: output/bench-accuracy, or "
                                                      "output/bench-accuracy-quick with --quick)")
    parser.add_argument("--teacher-ckpt", type=Path, help="use this teacher weight file instead of training one")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--out", type=Path, help="report files without suffix (default: benchmarks/results/"
                                                 "accuracy-fashion-mnist[-quick]); .md, .png and .json are written")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the finished runs")
    parser.add_argument("--note", default="", help="a line recorded in the report (e.g. the code version)")
    for key in ("train_subset", "epochs"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=STUDY[key],
                            help=f"student training (default {STUDY[key]}; another value needs another --work-dir)")
    parser.add_argument("--student", default=STUDY["student"], help=f"student model (default {STUDY['student']})")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.methods = _names(args.methods, list(METHODS), "--methods")
        args.ablations = _names(args.ablations, list(ABLATIONS), "--ablations")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.quick:
        args.methods, args.seeds, args.ablations = QUICK["methods"], list(QUICK["seeds"]), QUICK["ablations"]
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    suffix = "-quick" if args.quick else ""
    args.work_dir = args.work_dir or REPO / "output" / f"bench-accuracy{suffix}"
    args.out = args.out or RESULTS / f"accuracy-fashion-mnist{suffix}"
    return args


def selected_runs(args: argparse.Namespace) -> list[RunSpec]:
    specs = [RunSpec(METHODS[m], seed) for seed in args.seeds for m in args.methods]
    specs += [RunSpec(ABLATIONS[a], seed) for seed in args.ablation_seeds for a in args.ablations]
    return list(dict.fromkeys(specs))


def report_meta(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """A report's provenance: the date, the note, the command as given (without --note, which is shown on its own)
    and the work folder."""
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:
        del given[given.index("--note"):given.index("--note") + 2]
    return {"date": datetime.date.today().isoformat(), "note": args.note, "command": " ".join(given),
            "work_dir": str(args.work_dir)}


def exit_code(failures: Sequence[str]) -> int:
    """Prints each failed run's line; 1 when any failed, else 0."""
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr, flush=True)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None, *, train: Runner | None = None, evaluate: Runner | None = None) -> int:
    args = parse_args(argv)
    settings = {**STUDY, "train_subset": args.train_subset, "epochs": args.epochs, "student": args.student,
                "data_dir": args.data_dir}
    try:
        study = Study(args.work_dir, settings, train=train or subprocess_runner("diffkd.train"),
                      evaluate=evaluate or subprocess_runner("diffkd.eval"))
        failures = [] if args.report_only else study.run(selected_runs(args), args.teacher_ckpt, args.jobs)
        write_report(study, args.out, report_meta(args, argv))
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return exit_code(failures)


if __name__ == "__main__":
    sys.exit(main())
