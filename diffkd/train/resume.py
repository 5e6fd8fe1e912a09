"""A run's settings before anything is built: resolved for a new run, restored for a resumed one.

What a run records is what it needs to be continued from anywhere: absolute paths, the teacher file's content
hash, the device and the CPU thread count (both shape the arithmetic).  ``--resume`` restores all of them before the
runtime is set up; a setting given again with another value is refused, except the few that change neither the
model nor the data order (``ADJUSTABLE``) and ``--epochs`` (which extends or shortens the run).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from diffkd.cpu_features import cpu_supports_native_bf16
from diffkd.files import file_sha256, not_a_checkpoint
from diffkd.train.build import check_cuda_graph, resolve_path
from diffkd.train.checkpoint import read_checkpoint
from diffkd.train.cli import apply_recipe, build_parser
from diffkd.train.errors import UsageError
from diffkd.train.run_folder import ARGS, LAST, RunFolder, default_experiment_name
from diffkd.train.runtime import default_threads, resolve_device

# Settings that may differ when a run is resumed: they change neither the model nor the data order.
ADJUSTABLE = ("data_dir", "workers", "log_interval", "eval_interval", "eval_batch_size", "checkpoint_interval")
# Where the run is, not what it is: --resume FOLDER decides.
LOCATION = ("output", "experiment")
# Settings added after runs were first recorded, with the value every run recorded without them trained with: a
# resumed run keeps its losses even where today's default for its task differs (detection now normalises).
UNRECORDED_SETTINGS = {"feature_norm": "none"}


def _teacher_used(args) -> bool:
    return args.method != "none" and bool(args.teacher_ckpt)


def resolve_new_run(args: argparse.Namespace) -> list[str]:
    """Fills in what a new run records: absolute paths, the teacher's hash, the device, the threads and the
    precision; returns notes for the log."""
    if args.teacher_ckpt == "demo":
        from diffkd.train.demo import cached_demo_teacher  # demo imports this module
        args.teacher, args.teacher_ckpt = cached_demo_teacher(args.dataset, args.teacher)
    args.data_dir, args.output = resolve_path(args.data_dir), resolve_path(args.output)
    args.teacher_ckpt = resolve_path(args.teacher_ckpt)
    teacher_file = Path(args.teacher_ckpt) if args.teacher_ckpt else None
    if _teacher_used(args) and teacher_file.is_file() and not_a_checkpoint(teacher_file):
        raise UsageError(f"--teacher-ckpt {teacher_file} is not a checkpoint: it is {not_a_checkpoint(teacher_file)}; "
                         f"pass the teacher's weight file (.pth / .pt / .safetensors), or --teacher-ckpt demo")
    args.teacher_ckpt_sha256 = (file_sha256(teacher_file) if _teacher_used(args) and teacher_file.is_file()
                                else None)
    args.device = resolve_device(args.device)
    check_cuda_graph(args.cuda_graph, args.device)
    args.threads = args.threads or default_threads()
    notes = []
    if args.amp and args.device == "cpu" and args.amp_dtype == "bfloat16" and not cpu_supports_native_bf16():
        # Emulated bfloat16 is slower than float32; with AVX-512 BF16 or AMX a DiffKD step is ~1.4x faster.
        args.amp = False
        notes.append("note: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), where --amp would be slower than "
                     "float32: training in float32")
    return notes


def _latest_run(output: Path) -> RunFolder:
    """The run folder in ``output`` whose checkpoint (or, before its first one, settings) changed last."""
    runs = [RunFolder(path.parent) for path in (*output.glob(f"*/{LAST}"), *output.glob(f"*/{ARGS}"))]
    if not runs:
        raise UsageError(f"--resume: there is no run in {output}; pass --resume with the experiment folder of the "
                         f"run to continue (or --output FOLDER where it is)")
    return max(runs, key=lambda run: (run.last if run.has_checkpoint else run.path / ARGS).stat().st_mtime)


def _locate(args: argparse.Namespace, explicit: set[str]) -> tuple[RunFolder, Path | None, list[str]]:
    """The run folder to resume, the checkpoint file in it (None when the run stopped before its first) and notes:
    --resume FOLDER or FILE; --resume alone: <output>/<experiment> (the default name when the models are given),
    else the latest run in --output."""
    notes = []
    if args.resume:
        given = Path(args.resume)
        if given.is_file():
            if given.suffix not in (".pth", ".pt") and (given.parent / ARGS).is_file():
                raise UsageError(f"--resume {given} is a file inside a run, not its checkpoint; pass the run folder: "
                                 f"--resume {given.parent}")
            return RunFolder(given.parent), given, notes
        folder = RunFolder(given)
    elif args.experiment or {"student", *([] if args.method == "none" else ["teacher"])} <= explicit:
        folder = RunFolder(Path(args.output) / (args.experiment or default_experiment_name(args)))
    else:
        folder = _latest_run(Path(args.output))
        notes.append(f"note: --resume without a folder continues the latest run in {args.output}: {folder}")
    if not folder.path.is_dir():
        raise UsageError(f"--resume: there is no run folder {folder}; pass --resume with the experiment folder (or a "
                         f"checkpoint file in it) of the run to continue, or --demo --resume to continue the demo")
    return folder, folder.last if folder.has_checkpoint else None, notes


def _check_teacher(merged: argparse.Namespace, args: argparse.Namespace, explicit: set[str]) -> None:
    """The teacher file is found by its recorded path or the one given now, and must have the recorded content."""
    if not _teacher_used(merged):
        return
    recorded_hash = getattr(merged, "teacher_ckpt_sha256", None)
    if "teacher_ckpt" in explicit:
        candidate = Path(resolve_path(args.teacher_ckpt))
        if not candidate.is_file():
            raise UsageError(f"--teacher-ckpt {candidate} does not exist")
        if recorded_hash and file_sha256(candidate) != recorded_hash:
            raise UsageError(f"--teacher-ckpt {candidate} is not the teacher this run was trained with (its content "
                             f"differs from {merged.teacher_ckpt}); resume with the same teacher file")
        merged.teacher_ckpt = str(candidate)
        return
    recorded = Path(merged.teacher_ckpt)
    if not recorded.is_file():
        raise UsageError(f"the run's teacher file {recorded} is missing; if it moved, pass --teacher-ckpt NEW_PATH "
                         f"(it is checked against the content the run started with)")
    if recorded_hash and file_sha256(recorded) != recorded_hash:
        raise UsageError(f"the run's teacher file {recorded} changed since the run started (its content hash "
                         f"differs); put the original back, or start a new run (--experiment NAME)")


def resolve_resume(args: argparse.Namespace, explicit: set[str]) -> tuple[argparse.Namespace, dict | None, list[str]]:
    """The saved run's settings, with the adjustable ones given now, its checkpoint (None: start from step 0, for
    a run that stopped before its first checkpoint) and notes for the log."""
    folder, path, notes = _locate(args, explicit)
    checkpoint = read_checkpoint(path) if path is not None else None
    saved = dict(checkpoint["args"]) if checkpoint is not None else folder.saved_args()
    if saved is None:
        raise UsageError(f"--resume: {folder} holds neither {LAST} nor args.yaml, so there is no run to continue; "
                         f"start one with the flags you want (and --experiment {folder.path.name})")
    saved.pop("max_steps", None)  # runs of older versions recorded it; it caps one invocation only
    defaults = build_parser().parse_args(["--dataset", saved.get("dataset", "fashion-mnist"),
                                          "--task", saved.get("task", "classification")])
    apply_recipe(defaults)
    merged = argparse.Namespace(**{**vars(defaults), **UNRECORDED_SETTINGS, **saved})
    merged.threads = merged.threads or default_threads()
    merged.device = resolve_device(merged.device)
    given = {key: getattr(args, key) for key in explicit}
    if "device" in given:
        given["device"] = resolve_device(given["device"])
    if "data_dir" in given:
        given["data_dir"] = resolve_path(given["data_dir"])
    fixed = set(given) - set(ADJUSTABLE) - set(LOCATION) - {"epochs", "teacher_ckpt", "max_steps"}
    changed = [f"{key} (saved {saved.get(key)!r}, given {given[key]!r})" for key in sorted(fixed)
               if key in vars(merged) and getattr(merged, key) != given[key]]
    if changed:
        why = (" (the device and the CPU thread count change the arithmetic, so the run would not continue "
               "bit-identically)" if {"threads", "device"} & {c.split(" ")[0] for c in changed} else "")
        raise UsageError(f"--resume continues the saved run, whose settings differ from the ones given: "
                         f"{'; '.join(changed)}{why}. Drop those flags, or start a new run with --experiment NAME")
    for key in set(given) & {*ADJUSTABLE, "epochs"}:
        setattr(merged, key, given[key])
    _check_teacher(merged, args, explicit)
    if merged.epochs != saved["epochs"]:
        notes.append(f"note: --epochs changed from {saved['epochs']} to {merged.epochs}: the LR schedule is "
                     f"recomputed for the new length")
    if checkpoint is None:
        notes.append(f"note: {folder} holds no checkpoint (its run stopped before the first one): starting it from "
                     f"step 0 with its recorded settings")
    merged.output, merged.experiment = str(folder.path.parent.resolve()), folder.path.name
    merged.resume, merged.max_steps, merged.config = str(path or folder.path), args.max_steps, None
    return merged, checkpoint, notes
