"""When does DiffKD beat plain feature MSE?  A seeded study on full Fashion-MNIST across two capacity gaps.

The paper (Huang et al., "Knowledge Diffusion for Distillation", NeurIPS 2023) treats the student's feature as a
noisy version of the teacher's and argues that denoising it matters more as the capacity gap grows.  This study
measures that on all 60,000 Fashion-MNIST training images and the 10,000 test images, with teachers clearly better
than every student:

- main arm: teacher resnet14 (0.18 M parameters), student resnet8 (0.08 M) for 2 epochs (batch 64, SGD lr 0.1,
  cosine, weight decay 5e-4, float32, one thread per run); methods none, kd, mse, diffkd (the loss weights of
  benchmarks/bench_accuracy.py: the CIFAR-100 column of the paper's recipes); seeds 0–4, then 5–9, then 10–14
  when the per-seed spread (std) of DiffKD − MSE is above 0.6 points;
- gap arm: teacher resnet56 (0.86 M parameters, 11× the student), the same student, methods mse and diffkd,
  seeds 0–9;
- ablations of DiffKD on the main arm's pair, seeds 0–4: without adaptive noise matching, the feature head's
  compression (linear autoencoder, PCA fitted on teacher features, fixed random projection; 32 channels, half the
  teacher's 64; "none" is diffkd itself), its distance (cosine, Pearson; MSE is diffkd itself), NFE 1 (NFE 5 is
  diffkd itself), and the DiffKD feature head alone against it plus KD on the logits.

The plan runs in that order (the issue's priority: main arm, gap arm, ablations), one stage after the other.  The
teachers: ``--teacher-ckpt`` / ``--gap-teacher-ckpt`` weight files, or trained once by this script with its own
recipe (``--teacher-epochs`` / ``--gap-teacher-epochs`` on all training images, seed 0, the students' optimiser
settings) and kept in the work folder.  The deeper resnet56 needs more epochs than resnet14 to be the better teacher:
after 3 epochs it reached 90.12% against resnet14's 91.24%, so its default is 6.  Every run is
``python -m diffkd.train`` in a subprocess (``--jobs`` at a time, one thread each) with its own folder; a finished
run is never redone and an interrupted one resumes (benchmarks/bench_accuracy.py's Study).
Each launch records its provenance in the run folder (provenance.json: command, precision, threads, CPU model,
torch version, commit, the teacher file's SHA-256).  After each stage the report (benchmarks/gap_report.py) is
rewritten from every finished run: top-1 with paired 95% intervals, γ, and the noise gap of each run's last.pth
(diffkd.noise_gap).

    python benchmarks/bench_gap.py --jobs 1 --teacher-ckpt T14.pth --gap-teacher-ckpt T56.pth   # the study
    python benchmarks/bench_gap.py --quick                     # 1,000 images, 1 epoch, 2 seeds: a few minutes
    python benchmarks/bench_gap.py --report-only               # the report of the finished runs

Measured on a busy shared 2-core machine (one thread per run at nice 10, beside other jobs): --quick 5 min 40 s
with its teacher; full-data runs 19 min (student alone) and 22 min (KD).  The issue measured one epoch on a quiet
core at 1.1 (alone), 1.6 (MSE) and 2.9 min (DiffKD), so the main arm's 10 seeds are about 2.5 h of one quiet core
and the whole plan (105 runs) roughly 10 h.  Where others edit the working tree meanwhile, run the study from a
frozen checkout (``git worktree add --detach ../frozen HEAD``; ``--work-dir`` and ``--out`` can point back), so
that every run uses one commit: the provenance records ``git describe --dirty``.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_accuracy import (METHODS, RESULTS, REPO, Runner, RunSpec, Study, Variant, exit_code,
                                       finished_row, paired_difference, subprocess_runner, training_argv)

STUDY = {"dataset": "fashion-mnist", "student": "resnet8", "train_subset": 60000, "epochs": 2, "batch_size": 64,
         "lr": 0.1, "sched": "cosine", "weight_decay": 5e-4}
QUICK = {"train_subset": 1000, "epochs": 1, "seeds": (0, 1), "teacher_epochs": 1}
ARMS = {"main": ("resnet14", ("none", "kd", "mse", "diffkd")), "gap": ("resnet56", ("mse", "diffkd"))}
LATENT = "32"  # the compressions' latent width: half the teacher's 64 channels
ABLATIONS = {v.name: v for v in (
    Variant("diffkd-no-anm", ("--method", "diffkd", "--no-anm"), "DiffKD without adaptive noise matching"),
    Variant("diffkd-ae32", ("--method", "diffkd", "--compression", "ae", "--ae-channels", LATENT),
            "DiffKD, linear autoencoder to 32 channels on the feature head"),
    Variant("diffkd-pca32", ("--method", "diffkd", "--compression", "pca", "--ae-channels", LATENT),
            "DiffKD, PCA of the teacher feature to 32 channels"),
    Variant("diffkd-random32", ("--method", "diffkd", "--compression", "random", "--ae-channels", LATENT),
            "DiffKD, fixed random orthogonal projection to 32 channels"),
    Variant("diffkd-cosine", ("--method", "diffkd", "--feature-distance", "cosine"),
            "DiffKD, cosine distance on the feature head"),
    Variant("diffkd-pearson", ("--method", "diffkd", "--feature-distance", "pearson"),
            "DiffKD, Pearson distance on the feature head"),
    Variant("diffkd-nfe1", ("--method", "diffkd", "--nfe", "1"), "DiffKD, NFE 1"),
    Variant("diffkd-feature", ("--method", "diffkd", "--heads", "feature"), "DiffKD, feature head only"),
    Variant("diffkd-feature-kd", ("--method", "diffkd", "--heads", "feature", "--logit-kd-weight", "0.9"),
            "DiffKD feature head + KD on the logits (KL, τ 4, weight 0.9)"),
)}
VARIANTS = {**{name: METHODS[name] for name in ARMS["main"][1]}, **ABLATIONS}
SPREAD_LIMIT = 0.6  # extend the main arm to 15 seeds when the std of DiffKD − MSE over seeds is above this


@dataclass(frozen=True)
class Stage:
    arm: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    only_if_spread_above: float | None = None  # run only when DiffKD − MSE's per-seed std exceeds this


def plan(seeds_first: Sequence[int], seeds_more: Sequence[int], seeds_extra: Sequence[int],
         gap_seeds: Sequence[int], ablation_seeds: Sequence[int], ablations: Sequence[str]) -> list[Stage]:
    main = ARMS["main"][1]
    stages = [Stage("main", main, tuple(seeds_first)), Stage("main", main, tuple(seeds_more)),
              Stage("main", main, tuple(seeds_extra), SPREAD_LIMIT), Stage("gap", ARMS["gap"][1], tuple(gap_seeds)),
              Stage("main", tuple(ablations), tuple(ablation_seeds))]
    return [s for s in stages if s.variants and s.seeds]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The code's commit, with "-dirty" when the working tree has changes (the runs use the working tree)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


class GapStudy(Study):
    """One arm's work folder: bench_accuracy's Study with this study's teacher recipe, variants and provenance."""

    def __init__(self, work_dir: Path, settings: Mapping, *, teacher_epochs: int, train: Runner, evaluate: Runner,
                 log=print):
        super().__init__(work_dir, settings, train=train, evaluate=evaluate, log=log)
        self.teacher_epochs = teacher_epochs
        self.teacher_path: Path | None = None

    def teacher(self, given: Path | None) -> Path:
        """``given``, or the teacher this arm trained with the study's recipe (trained now if missing)."""
        if given is not None:
            self.teacher_path = super().teacher(given)
            return self.teacher_path
        name, epochs = self.settings["teacher"], self.teacher_epochs
        path = self.work_dir / f"teacher-{name}-{epochs}ep.pth"
        if not path.is_file():
            folder = self.runs_dir / f"teacher-{name}-{epochs}ep"
            argv = training_argv(self.settings, model=name, epochs=epochs, train_subset=self.settings["train_subset"],
                                 seed=0, runs_dir=self.runs_dir, experiment=folder.name, flags=("--method", "none"))
            self.log(f"teacher {name}: training it once ({epochs} epochs on {self.settings['train_subset']} images); "
                     f"kept as {path}")
            self._run_to_completion(folder, argv, epochs, "the teacher")
            log_path = self.work_dir / "logs" / "teacher-export.txt"
            if self.evaluate([str(folder / "last.pth"), "--export", str(path), "--no-eval"], log_path) != 0 \
                    or not path.is_file():
                raise RuntimeError(f"exporting the teacher failed; see {log_path}")
        self.teacher_path = path
        return path

    def _run_to_completion(self, folder: Path, argv: list[str], epochs: int, what: str) -> None:
        if finished_row(folder, epochs) is None:
            self._record_launch(folder, argv)
        super()._run_to_completion(folder, argv, epochs, what)

    def _record_launch(self, folder: Path, argv: Sequence[str]) -> None:
        """Appends this launch's provenance to the run's provenance.json (a resumed run has several)."""
        import torch

        teacher = Path(argv[argv.index("--teacher-ckpt") + 1]) if "--teacher-ckpt" in argv else None
        launch = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["python", "-m", "diffkd.train", *argv]),
                  "precision": "bfloat16 autocast" if "--amp" in argv else "float32",
                  "threads": int(argv[argv.index("--threads") + 1]), "cpu_model": cpu_model(),
                  "torch": torch.__version__, "python": platform.python_version(), "commit": commit(),
                  "teacher_file": str(teacher) if teacher else None,
                  "teacher_sha256": sha256(teacher) if teacher else None}
        path = self.work_dir / "provenance" / f"{folder.name}.json"  # outside the run folder, which a restart clears
        path.parent.mkdir(parents=True, exist_ok=True)
        launches = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps([*launches, launch], indent=1) + "\n")

    def provenance(self, run: str) -> list[dict]:
        path = self.work_dir / "provenance" / f"{run}.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def results(self) -> dict[str, dict[int, dict]]:
        """variant name → seed → the last epoch's summary row, for every finished run of this study's variants."""
        table: dict[str, dict[int, dict]] = {}
        for folder in sorted(self.runs_dir.glob("*-seed*")):
            variant, _, seed = folder.name.rpartition("-seed")
            row = finished_row(folder, self.settings["epochs"])
            if variant in VARIANTS and seed.isdigit() and row is not None:
                table.setdefault(variant, {})[int(seed)] = row
        return {name: dict(sorted(table[name].items())) for name in VARIANTS if name in table}


def arm_settings(args: argparse.Namespace, arm: str) -> dict:
    teacher = args.teacher if arm == "main" else args.gap_teacher
    return {**STUDY, "train_subset": args.train_subset, "epochs": args.epochs, "teacher": teacher,
            "data_dir": args.data_dir}


def open_arm(args: argparse.Namespace, arm: str, train: Runner | None = None,
             evaluate: Runner | None = None) -> GapStudy:
    epochs = args.teacher_epochs if arm == "main" else args.gap_teacher_epochs
    return GapStudy(args.work_dir / arm, arm_settings(args, arm), teacher_epochs=epochs,
                    train=train or subprocess_runner("diffkd.train"),
                    evaluate=evaluate or subprocess_runner("diffkd.eval"))


def main_arm_spread(study: GapStudy) -> float | None:
    """The per-seed std of DiffKD − MSE over the main arm's finished seeds (None with fewer than 2)."""
    top1 = {name: {seed: float(row["val_top1"]) for seed, row in rows.items()}
            for name, rows in study.results().items()}
    if "diffkd" not in top1 or "mse" not in top1:
        return None
    difference = paired_difference(top1["diffkd"], top1["mse"])
    return None if difference is None or len(difference.seeds) < 2 else difference.std


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _seeds(text: str) -> tuple[int, ...]:
    """"0-4" or "0,1,2" or "" (none)."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        if not (low.isdigit() and (not high or high.isdigit())):
            raise argparse.ArgumentTypeError(f"seeds: expected e.g. 0-4 or 0,1,2, got {text!r}")
        seeds += range(int(low), int(high or low) + 1)
    return tuple(seeds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add = parser.add_argument
    add("--jobs", type=int, default=1, help="runs at a time, one thread each (default 1)")
    add("--quick", action="store_true", help=f"{QUICK['train_subset']} training images, {QUICK['epochs']} epoch, "
                                             "seeds 0 and 1, main arm methods only, teacher trained for 1 epoch "
                                             "unless given; own work folder and report (a few minutes)")
    add("--teacher", default=ARMS["main"][0], help="the main arm's teacher model (default %(default)s)")
    add("--teacher-ckpt", type=Path, help="its weight file (default: train it with --teacher-epochs)")
    add("--gap-teacher", default=ARMS["gap"][0], help="the gap arm's teacher model (default %(default)s)")
    add("--gap-teacher-ckpt", type=Path, help="its weight file (default: train it with --gap-teacher-epochs)")
    add("--teacher-epochs", type=int, default=3, help="epochs of the main arm's teacher when this script trains it "
                                                       "(default 3)")
    add("--gap-teacher-epochs", type=int, default=6, help="epochs of the gap arm's teacher when this script trains it "
                                                           "(default 6)")
    add("--seeds", type=_seeds, default=_seeds("0-4"), help="the main arm's first seeds (default 0-4)")
    add("--more-seeds", type=_seeds, default=_seeds("5-9"), help="its next seeds (default 5-9)")
    add("--extra-seeds", type=_seeds, default=_seeds("10-14"),
        help=f"seeds added when DiffKD − MSE's per-seed std is above {SPREAD_LIMIT} (default 10-14)")
    add("--gap-seeds", type=_seeds, default=_seeds("0-9"), help="the gap arm's seeds (default 0-9; '' = none)")
    add("--ablation-seeds", type=_seeds, default=_seeds("0-4"), help="the ablations' seeds (default 0-4; '' = none)")
    add("--ablations", default=",".join(ABLATIONS), help="comma-separated, from the default (all), or ''")
    add("--work-dir", type=Path, help="runs and teachers (default output/bench-gap, -quick with --quick)")
    add("--out", type=Path, help="report files without suffix (default benchmarks/results/gap-fashion-mnist; "
                                 "with --quick, in the work folder)")
    add("--data-dir", help="Fashion-MNIST folder (default: the Debian package's)")
    add("--report-only", action="store_true", help="run nothing; report the finished runs")
    add("--no-report", action="store_true", help="run the plan without writing the report")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.ablations = tuple(filter(None, (a.strip() for a in args.ablations.split(","))))
    unknown = [a for a in args.ablations if a not in ABLATIONS]
    if unknown:
        parser.error(f"--ablations: unknown {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    if min(args.jobs, args.teacher_epochs, args.gap_teacher_epochs) < 1:
        parser.error(f"--jobs, --teacher-epochs and --gap-teacher-epochs must be >= 1, got {args.jobs}, "
                     f"{args.teacher_epochs} and {args.gap_teacher_epochs}")
    args.train_subset, args.epochs = STUDY["train_subset"], STUDY["epochs"]
    if args.quick:
        args.train_subset, args.epochs = QUICK["train_subset"], QUICK["epochs"]
        args.seeds, args.more_seeds, args.extra_seeds = QUICK["seeds"], (), ()
        args.gap_seeds, args.ablation_seeds = (), ()
        if args.teacher_ckpt is None:
            args.teacher_epochs = QUICK["teacher_epochs"]
        if args.gap_teacher_ckpt is None:
            args.gap_teacher_epochs = QUICK["teacher_epochs"]
    args.work_dir = args.work_dir or REPO / "output" / ("bench-gap-quick" if args.quick else "bench-gap")
    args.out = args.out or (args.work_dir / "report" / "gap-fashion-mnist-quick" if args.quick
                            else RESULTS / "gap-fashion-mnist")
    return args


def run_plan(args: argparse.Namespace, train: Runner | None = None, evaluate: Runner | None = None) -> list[str]:
    """Runs every stage's unfinished runs; returns the failures (later stages still run)."""
    stages = plan(args.seeds, args.more_seeds, args.extra_seeds, args.gap_seeds, args.ablation_seeds, args.ablations)
    failures: list[str] = []
    for number, stage in enumerate(stages, 1):
        study = open_arm(args, stage.arm, train, evaluate)
        if stage.only_if_spread_above is not None:
            spread = main_arm_spread(study)
            if spread is None or spread <= stage.only_if_spread_above:
                print(f"stage {number}: DiffKD − MSE per-seed std {spread if spread is None else f'{spread:.2f}'} "
                      f"is not above {stage.only_if_spread_above}; seeds {list(stage.seeds)} not needed", flush=True)
                continue
        print(f"stage {number}/{len(stages)}: {stage.arm} arm, {', '.join(stage.variants)}, seeds "
              f"{list(stage.seeds)}", flush=True)
        given = args.teacher_ckpt if stage.arm == "main" else args.gap_teacher_ckpt
        specs = [RunSpec(VARIANTS[v], seed) for seed in stage.seeds for v in stage.variants]
        try:
            failures += study.run(specs, given, args.jobs)
        except (ValueError, RuntimeError) as error:  # e.g. a teacher file not there yet: the next stages still run
            failures.append(f"stage {number} ({stage.arm} arm): {error}")
            print(f"error: {failures[-1]}", file=sys.stderr, flush=True)
        if not args.no_report:
            write_report_now(args)
    return failures


def write_report_now(args: argparse.Namespace) -> int:
    """The report in a fresh process, so that a long study reports with the code of the day it finishes."""
    argv = [sys.executable, str(REPO / "benchmarks" / "gap_report.py"), "--work-dir", str(args.work_dir),
            "--out", str(args.out), "--epochs", str(args.epochs)]
    code = subprocess.run(argv, cwd=REPO).returncode
    if code != 0:
        print(f"error: the report failed (exit code {code}): {' '.join(argv)}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None, *, train: Runner | None = None, evaluate: Runner | None = None) -> int:
    args = parse_args(argv)
    try:
        failures = [] if args.report_only else run_plan(args, train, evaluate)
    except ValueError as error:  # a work folder of other settings
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    if args.report_only and write_report_now(args) != 0:
        return 2
    return exit_code(failures)


if __name__ == "__main__":
    sys.exit(main())
