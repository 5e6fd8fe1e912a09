"""A run's folder, ``<output>/<experiment>/``: its name, what it may be used for, and the files in it.

``args.yaml`` (every resolved setting; it also works as a ``-c`` config), ``env.txt`` (versions and device, one
block per start), ``log.txt`` (every printed line), ``summary.csv`` (one row per epoch), ``last.pth`` / ``best.pth``
(checkpoints) and ``plots/``.  A folder without a checkpoint holds a run that stopped before its first one: a
fresh run may take it over (its log is kept and appended to) and ``--resume`` starts it from step 0.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import yaml

from diffkd.files import write_text_atomically
from diffkd.train.cli import NOT_STORED
from diffkd.train.errors import UsageError

LAST, BEST, ARGS = "last.pth", "best.pth", "args.yaml"


def default_experiment_name(args: argparse.Namespace) -> str:
    models = args.student if args.method == "none" else f"{args.teacher}_{args.student}"
    return f"{args.dataset}-{args.method}-{models}-seed{args.seed}".replace("/", "_")


def run_title(args: argparse.Namespace, folder_name: str) -> str:
    """The title of a run's plots: what was trained, how, with which seed ("none" is no method to show)."""
    if args.method == "none":
        return f"{folder_name}: {args.student} trained alone, seed {args.seed}"
    return f"{folder_name}: {args.student} distilled from {args.teacher} by {args.method}, seed {args.seed}"


def stored_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in NOT_STORED}


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def has_checkpoint(self) -> bool:
        return self.last.is_file()

    def saved_args(self) -> dict | None:
        """The settings in args.yaml, or None when the folder has none."""
        path = self.path / ARGS
        if not path.is_file():
            return None
        try:
            content = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise UsageError(f"{path} could not be read ({error}); it records the run's settings") from None
        if not isinstance(content, dict):
            raise UsageError(f"{path} does not hold a run's settings (a mapping), got {type(content).__name__}")
        return content

    def check_usable(self, *, resume: bool) -> None:
        """Refuses, before anything is written, an output path that is a file, or a folder holding a run that a
        new run would overwrite."""
        for path in [*reversed(self.path.parents), self.path]:
            if path.exists() and not path.is_dir():
                raise UsageError(f"output path {path} is a file, not a folder; pass --output / --experiment naming a "
                                 f"folder (nothing was written)")
        if not resume and self.has_checkpoint:
            raise UsageError(f"experiment folder {self.path} already holds a run; pass --resume {self.path} to "
                             f"continue it, or --experiment NAME for a new folder (nothing was overwritten)")

    def start(self, args: argparse.Namespace, environment: str, note: str) -> None:
        """Creates the folder (main process) and records the settings and the environment of this start."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.path / ARGS, yaml.safe_dump(stored_args(args), sort_keys=False))
        with open(self.path / "env.txt", "a") as file:
            file.write((f"\n{note}\n" if note else "") + environment)

    def write_outputs(self, history: list[dict], title: str) -> None:
        write_summary(self.path / "summary.csv", history)
        from diffkd.plots import plot_history  # matplotlib loads only when a run writes plots
        plot_history(history, self.path / "plots", title=title)


def write_summary(path: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomically(path, text.getvalue())
