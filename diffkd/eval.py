"""``python -m diffkd.eval CHECKPOINT``: test accuracy, mAP or mIoU of a trained student; ``--export`` writes it alone.

CHECKPOINT is the ``last.pth`` / ``best.pth`` of a ``diffkd.train`` run (its settings say which dataset and
model), a file written by ``--export`` (it records its model, task and dataset), or, with ``--model``, a weight
file in the CIFAR benchmark's format (``{"model": state_dict}``) or any format
:func:`diffkd.models.load_checkpoint` reads.  ``--export FILE`` writes the student of a training
checkpoint in the benchmark's format, ready for ``--teacher-ckpt`` or the benchmark's own code.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from diffkd.train.checkpoint import as_training_checkpoint, export_student, load_file, read_checkpoint
from diffkd.train.cli import ALL_DATASETS, ArgumentParser, HelpFormatter, check_task_and_dataset
from diffkd.train.cli import parse_args as train_parse_args
from diffkd.train.errors import UsageError
from diffkd.train.flag_values import path_text, positive_int
from diffkd.train.runtime import Precision, Runtime, setup_runtime
from diffkd.train.tasks import TASK_NAMES, task_of


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m diffkd.eval", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="last.pth / best.pth of a diffkd run, or a weight file with --model")
    parser.add_argument("--model", help="model name for a plain weight file (training checkpoints name their own)")
    parser.add_argument("--task", choices=TASK_NAMES,
                        help="what the model predicts (default: the run's, or the exported file's; classification)")
    parser.add_argument("--dataset", choices=ALL_DATASETS,
                        help="dataset to test on (default: the run's, or the exported file's; fashion-mnist for "
                             "plain weight files)")
    parser.add_argument("--data-dir", type=path_text,
                        help="dataset folder (default: the run's, or the dataset's default)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=256, help="images per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: every core available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast")
    parser.add_argument("--export", type=path_text, metavar="FILE",
                        help="write the student alone as {'model': state_dict}")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", help="only --export, no test pass")
    parser.add_argument("--diagnose", nargs="?", const="", metavar="FOLDER",
                        help="DiffKD runs: also the NFE diagnosis on the test set (diffkd.diagnose: distance to the "
                             "teacher per number of denoising steps and along the chain), printed and written as "
                             "nfe-diagnosis.{json,csv,png} next to the checkpoint, or in FOLDER")
    parser.add_argument("--noise-gap", action="store_true",
                        help="also how much of the teacher's feature the student's does not explain (diffkd.noise_gap: "
                             "ridge SNR and 1 − R² both ways, linear CKA; per DiffKD head raw, after the projection "
                             "and after denoising), fitted on 10,000 training images, scored on the test set")
    parser.add_argument("--noise-gap-against", type=path_text, metavar="OTHER.pth",
                        help="the noise gap against the student of another run's last.pth instead of the teacher, "
                             "e.g. another seed of the same recipe: what two students do not explain of each other "
                             "is seed-specific, the reference level for the gap to the teacher (implies --noise-gap)")
    return parser


def _test_settings(args: argparse.Namespace, recorded: dict) -> argparse.Namespace:
    """The settings the test data and the model are built from: the run's (or the file's), the flags given here
    win; the dataset's own defaults fill the rest."""
    task = args.task or recorded.get("task") or "classification"
    dataset = args.dataset or (recorded.get("dataset") if recorded.get("task", "classification") == task else None) \
        or ("fashion-mnist" if task == "classification" else "fashion-scenes")
    try:
        check_task_and_dataset(task, dataset)
    except UsageError as error:
        raise UsageError(f"{error} (choose with --task / --dataset)") from None
    settings, _ = train_parse_args(["--task", task, "--dataset", dataset])
    if recorded.get("dataset") == dataset:
        vars(settings).update({k: v for k, v in recorded.items() if k in ("data_dir", "image_size", "num_classes",
                                                                            "fpn_channels", "val_subset")})
    if args.data_dir:
        settings.data_dir = args.data_dir
    settings.student = args.model or recorded.get("student")
    settings.batch_size, settings.grad_accum_steps, settings.eval_batch_size = 1, 1, args.batch_size
    if settings.student is None:
        raise UsageError(f"{args.checkpoint} is a plain weight file that does not name its model: pass --model NAME "
                         f"(e.g. --model resnet8x4)")
    return settings


def run(args: argparse.Namespace, runtime: Runtime) -> dict | None:
    path = Path(args.checkpoint)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    content = load_file(path)
    checkpoint = as_training_checkpoint(content, path, required=False)
    run_args = checkpoint["args"] if checkpoint is not None else None
    # A training checkpoint names its student, task and dataset; a file written by --export records them too.
    recorded = run_args or ({"student": content.get("arch"), "dataset": content.get("dataset"),
                             "task": content.get("task")} if isinstance(content, dict) else {})
    if args.export:
        export_path = Path(args.export)
        if checkpoint is None:
            raise UsageError(f"--export takes the last.pth / best.pth of a diffkd run; {path} is a plain weight "
                             f"file already")
        if export_path.exists():
            raise UsageError(f"--export {export_path} already exists; choose another file name (nothing was "
                             f"overwritten)")
        if not export_path.parent.is_dir():
            raise UsageError(f"--export {export_path}: folder {export_path.parent} does not exist")
        try:
            export_student(checkpoint, export_path)
        except OSError as error:
            raise UsageError(f"--export {export_path} could not be written ({error.strerror or error}); choose a "
                             f"folder you can write to (nothing was written)") from None
        runtime.log(f"exported the student {run_args['student']} (epoch {checkpoint['epoch']}) to {export_path}")
    if args.diagnose is not None and (checkpoint is None or not args.evaluate or runtime.distributed):
        raise UsageError("--diagnose takes the last.pth / best.pth of a DiffKD run, in one process, with the test "
                         "pass (without --no-eval)")
    other_run = read_checkpoint(Path(args.noise_gap_against)) if args.noise_gap_against else None
    if (args.noise_gap or other_run) and (checkpoint is None or not args.evaluate):
        raise UsageError("--noise-gap and --noise-gap-against take the last.pth / best.pth of a diffkd run, with the "
                         "test pass (without --no-eval)")
    if not args.evaluate:
        return None
    settings = _test_settings(args, recorded)
    task = task_of(settings.task)
    if args.diagnose is not None and task.name != "classification":
        raise UsageError("--diagnose analyses the DiffKD heads of a classification run; this run is "
                         f"{task.name}")
    data = task.build_data(settings, runtime, test_only=True)
    model = task.create_student(settings.student, data.info, str(path), args=settings).to(runtime.device)
    precision = Precision(runtime.device.type, torch.bfloat16 if args.amp else None)
    runtime.log(f"testing {path} on {data.val_size} {settings.dataset} test images, {args.batch_size} per "
                f"batch ...")
    metrics = task.evaluate(model, data.val_loader, runtime, precision, channels_last=False)
    epoch = f" (epoch {checkpoint['epoch']})" if checkpoint is not None else ""
    runtime.log(f"{path}{epoch}: {settings.dataset} test {task.describe(metrics)} on {data.val_size} images")
    if args.diagnose is not None:
        from diffkd.diagnose import run_diagnosis  # matplotlib loads only when asked for
        try:
            run_diagnosis(checkpoint, batches=data.val_loader, info=data.info,
                          folder=Path(args.diagnose or path.parent),
                          title=f"{path.parent.name}/{path.name}{epoch}: NFE diagnosis", device=runtime.device,
                          log=runtime.log)
        except ValueError as error:
            raise UsageError(f"--diagnose: {error}") from None
    if args.noise_gap or other_run:
        from diffkd.noise_gap import checkpoint_report  # the training images load only when asked for
        try:
            runtime.log(checkpoint_report(checkpoint, dataset=settings.dataset, data_dir=settings.data_dir,
                                          task=task.name, device=runtime.device, against=other_run))
        except ValueError as error:
            raise UsageError(f"--noise-gap{'-against' if other_run else ''}: {error}") from None
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args, setup_runtime(args.device, args.threads))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
