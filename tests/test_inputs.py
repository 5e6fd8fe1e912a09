"""Bad and unusual input to ``python -m diffkd.train`` and ``python -m diffkd.eval``: every case is one line that
says what is wrong and what to do, exit code 2, nothing written that blocks a rerun, and no model or data built.

The table holds what a hurried user types: misspelt or prefixed flags, impossible numbers, flags that do nothing
for the chosen method or dataset, paths that climb out of the output folder, and files that are not checkpoints.
"""
import datetime
import zipfile
from types import SimpleNamespace

import pytest
import torch
import yaml

from diffkd import eval as diffkd_eval
from diffkd import train
from diffkd.files import not_a_checkpoint
from diffkd.train import build as train_build
from diffkd.train import demo as train_demo
from diffkd.train import runs as train_runs
from diffkd.train.cli import parse_args
from train_cli import REPO, assert_clean_failure, common, data_dir, run_cli  # noqa: F401

@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fails any case that gets as far as building a run (its models and data) or a test pass."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run or a test pass was set up before the input was refused")

    monkeypatch.setattr(train_runs, "Trainer", refuse)
    monkeypatch.setattr(diffkd_eval, "task_of", refuse)


@pytest.fixture
def files(tmp_path):
    """Files that are not checkpoints, and a run folder (its settings and summary, no checkpoint yet)."""
    (tmp_path / "notes.txt").write_text("remember: lr 0.1 worked best\n")
    (tmp_path / "picture.pth").write_bytes((REPO / "benchmarks/results/accuracy-fashion-mnist.png").read_bytes())
    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as archive:
        archive.writestr("weights.npy", b"not torch")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 256)) * 4)
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "args.yaml").write_text(yaml.safe_dump({"student": "resnet8", "method": "none"}))
    (run / "summary.csv").write_text("epoch,steps,val_top1\n1,6,50.0\n")
    return tmp_path


# (arguments, what the one line must say); {tmp} is the test's folder, {data} the tiny Fashion-MNIST.
TRAIN_CASES = {
    # numbers, checked by the parser with the flag's name
    "negative lr": (["--lr", "-0.1"], ["argument --lr", "must be > 0"]),
    "lr not a number": (["--lr", "fast"], ["argument --lr", "expected a number, got 'fast'"]),
    "lr nan": (["--lr", "nan"], ["argument --lr", "finite"]),
    "negative momentum": (["--momentum", "-1"], ["argument --momentum", "[0, 1)"]),
    "momentum 1": (["--momentum", "1"], ["argument --momentum", "[0, 1)"]),
    "zero epochs": (["--epochs", "0"], ["argument --epochs", "positive integer"]),
    "zero batch": (["-b", "0"], ["argument -b/--batch-size", "positive integer"]),
    "zero eval batch": (["--eval-batch-size", "0"], ["argument --eval-batch-size", "positive integer"]),
    "fractional batch": (["-b", "8.5"], ["argument -b/--batch-size", "whole number"]),
    "negative seed": (["--seed", "-1"], ["argument --seed", "0 .. 4294967295"]),
    "negative workers": (["--workers", "-1"], ["argument --workers", ">= 0"]),
    "decay rate as a divisor": (["--sched", "step", "--decay-rate", "10"], ["argument --decay-rate", "(0, 1]"]),
    "zero temperature": (["--method", "kd", "--kd-temperature", "0"], ["argument --kd-temperature", "> 0"]),
    "zero threads": (["--threads", "0"], ["argument --threads"]),
    "zero checkpoint interval": (["--checkpoint-interval", "0"], ["argument --checkpoint-interval"]),
    # names: whole flags only, typos get the nearest flag
    "prefix of --epochs": (["--epoch", "1"], ["unrecognized arguments: --epoch", "did you mean --epochs?"]),
    "prefix of --batch-size": (["--batch", "8"], ["unrecognized arguments: --batch", "did you mean --batch-size?"]),
    "misspelt flag": (["--learning-rate", "0.1"], ["unrecognized arguments", "--learning-rate"]),
    # where the run goes
    "experiment escapes": (["--experiment", "../escaped"], ["argument --experiment", "one folder name"]),
    "experiment is a path": (["--experiment", "a/b"], ["argument --experiment", "one folder name"]),
    "experiment is ..": (["--experiment", ".."], ["argument --experiment"]),
    "empty output": (["--output", ""], ["argument --output", "is empty"]),
    "empty data dir": (["--data-dir", ""], ["argument --data-dir", "is empty"]),
    # settings that would do nothing here
    "DiffKD flags with kd": (["--method", "kd", "--heads", "feature", "--nfe", "3"],
                             ["--heads has no effect", "--method is kd"]),
    "nfe with kd": (["--method", "kd", "--nfe", "3"], ["--nfe has no effect", "DiffKD setting"]),
    "image size on Fashion-MNIST": (["--image-size", "7"], ["--image-size has no effect", "fashion-mnist"]),
    "momentum with AdamW": (["--opt", "adamw", "--momentum", "0.5"], ["--momentum has no effect", "--opt sgd"]),
    "nesterov with AdamW": (["--opt", "adamw", "--nesterov"], ["--nesterov has no effect"]),
    "teacher without distillation": (["--method", "none", "--teacher", "resnet14"],
                                     ["--teacher has no effect", "--method none"]),
    "milestones with cosine": (["--decay-milestones", "3", "4"], ["--decay-milestones has no effect",
                                                                  "schedule is cosine"]),
    "min lr with step": (["--sched", "step", "--min-lr", "0.001"], ["--min-lr has no effect"]),
    "amp dtype without amp": (["--amp-dtype", "float16"], ["--amp-dtype has no effect", "--amp"]),
    "demo seeds without demo": (["--demo-seeds", "1", "2"], ["--demo-seeds has no effect", "--demo"]),
    "temperature with mse": (["--method", "mse", "--teacher", "resnet14", "--kd-temperature", "2"],
                             ["--kd-temperature has no effect"]),
    "DIST weights with kd": (["--method", "kd", "--dist-beta", "2"], ["--dist-beta has no effect"]),
    "fpn channels for a classifier": (["--fpn-channels", "64"], ["--fpn-channels has no effect"]),
    "seed in the demo": (["--demo", "--seed", "3"], ["--seed has no effect", "--demo-seeds"]),
    "method in the demo": (["--demo", "--method", "kd"], ["--method has no effect", "alone and with DiffKD"]),
    # files that are not checkpoints
    "teacher is a text file": (["--method", "kd", "--teacher", "resnet14", "--teacher-ckpt", "{tmp}/notes.txt"],
                               ["--teacher-ckpt", "notes.txt is not a checkpoint", "text file", "remember"]),
    "resume a file inside a run": (["--resume", "{tmp}/out/run/summary.csv"],
                                   ["is a file inside a run", "--resume {tmp}/out/run"]),
    "resume a text file": (["--resume", "{tmp}/notes.txt"], ["is not a checkpoint", "text file"]),
    "resume a picture": (["--resume", "{tmp}/picture.pth"], ["is not a checkpoint", "PNG image"]),
    "resume alone, nothing to resume": (["--resume", "--output", "{tmp}/nothing"], ["no run in"]),
}

EVAL_CASES = {
    "text file": (["{tmp}/notes.txt"], ["is not a checkpoint", "text file"]),
    "image": (["{tmp}/picture.pth"], ["is not a checkpoint", "PNG image"]),
    "zip of something else": (["{tmp}/archive.pth"], ["is not a checkpoint", "zip archive", "weights.npy"]),
    "empty file": (["{tmp}/empty.pth"], ["is not a checkpoint", "empty file"]),
    "random bytes": (["{tmp}/noise.pth"], ["is not a checkpoint", "binary file"]),
    "no such file": (["{tmp}/missing.pth"], ["no checkpoint at"]),
    "a folder": (["{tmp}/out"], ["no checkpoint at"]),
    "zero batch": (["{tmp}/notes.txt", "-b", "0"], ["argument -b/--batch-size", "positive integer"]),
    "negative batch": (["{tmp}/notes.txt", "-b", "-5"], ["argument -b/--batch-size"]),
    "zero threads": (["{tmp}/notes.txt", "--threads", "0"], ["argument --threads"]),
    "prefix of --batch-size": (["{tmp}/notes.txt", "--batch", "8"], ["unrecognized arguments: --batch"]),
    "empty export path": (["{tmp}/notes.txt", "--export", ""], ["argument --export", "is empty"]),
}


def _fill(tokens, tmp, data):
    return [str(token).format(tmp=tmp, data=data) for token in tokens]


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_training_input_is_one_line(case, files, data_dir, capsys, nothing_is_built):
    argv, needles = TRAIN_CASES[case]
    base = ["--data-dir", data_dir, "--output", files / "out", "--student", "resnet8"]
    if "--output" in argv:
        base = base[:2] + base[4:]
    code, out, err = run_cli(train, [*base, *_fill(argv, files, data_dir)], capsys)
    assert_clean_failure(code, err, *_fill(needles, files, data_dir))
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(path.name for path in (files / "out").iterdir()) == ["run"]  # nothing new written
    assert not (files / "escaped").exists() and not (files / "out" / "run" / "last.pth").exists()


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval_input_is_one_line(case, files, capsys, nothing_is_built):
    argv, needles = EVAL_CASES[case]
    code, _, err = run_cli(diffkd_eval, _fill(argv, files, ""), capsys)
    assert_clean_failure(code, err, *_fill(needles, files, ""))
    assert len(err.strip().splitlines()) == 1, err


def test_an_export_that_cannot_be_written_is_one_line(files, capsys, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, who may write anywhere)."""
    checkpoint = files / "run.pth"
    torch.save({"format": "diffkd.train", "version": 2, "epoch": 1, "history": [], "student": {},
                "args": {"student": "resnet8", "dataset": "fashion-mnist"}}, checkpoint)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(files / "locked" / "s.pth"))

    monkeypatch.setattr(diffkd_eval, "export_student", read_only)
    (files / "locked").mkdir()
    code, _, err = run_cli(diffkd_eval, [checkpoint, "--export", files / "locked" / "s.pth", "--no-eval"], capsys)
    assert_clean_failure(code, err, "could not be written (Permission denied)", "a folder you can write to")


@pytest.mark.parametrize("kind, content, expected", [
    ("text", b"epoch,steps\n1,2\n", "a text file (it starts 'epoch,steps')"),
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(40), "a PNG image"),
    ("jpeg", b"\xff\xd8\xff\xe0" + bytes(40), "a JPEG image"),
    ("utf-8 cut by the 512-byte read", ("a" + "é" * 300).encode(), "a text file"),
])
def test_not_a_checkpoint_recognises_files_by_their_bytes(kind, content, expected, tmp_path):
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    assert not_a_checkpoint(path).startswith(expected)
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    assert not_a_checkpoint(path) is None
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    assert not_a_checkpoint(path) is None


def test_a_config_that_sets_settings_without_effect_is_warned_not_refused(tmp_path, capsys):
    """A config may spell out one set of values for several methods: its no-op settings are warned about (only where
    they differ from the default), while the same flag typed on the command line is refused."""
    config = tmp_path / "kd.yaml"
    config.write_text("student: resnet8\nteacher: resnet14\nmethod: kd\nnfe: 3\nmomentum: 0.9\nopt: sgd\n")
    notes = []
    args, _ = parse_args(["-c", str(config)], notes)
    assert args.nfe == 3 and notes == ["warning: the config sets what has no effect here: nfe (it is a DiffKD "
                                       "setting and --method is kd)"]
    code, _, err = run_cli(train, ["-c", config, "--nfe", "4"], capsys)
    assert_clean_failure(code, err, "--nfe has no effect")
    run_record = tmp_path / "run" / "args.yaml"  # a run's record sets every method's settings by design
    run_record.parent.mkdir()
    run_record.write_text(config.read_text())
    notes.clear()
    assert parse_args(["-c", str(run_record)], notes)[0].nfe == 3 and notes == []
    config.write_text("student: resnet8\nlr: -1\n")
    assert_clean_failure(*run_cli(train, ["-c", config], capsys)[::2], str(config), "--lr", "must be > 0")


def test_lr_zero_is_allowed_with_a_warning(capsys):
    notes = []
    args, _ = parse_args(["--student", "resnet8", "--method", "none", "--lr", "0"], notes)
    assert args.lr == 0 and any("--lr 0" in note and "will not change any weight" in note for note in notes)


def test_val_subset_is_the_same_images_for_every_seed_and_method(data_dir):
    def test_images(*flags):
        args, _ = parse_args(["--data-dir", str(data_dir), "--student", "resnet8", "--val-subset", "10", *flags])
        data = train_build.build_data(args, train_demo.setup_runtime("cpu", 1), test_only=True)
        return torch.cat([images for images, _ in data.val_loader])

    reference = test_images("--method", "none", "--seed", "0")
    for flags in (("--method", "none", "--seed", "1"), ("--method", "kd", "--teacher", "resnet14", "--seed", "2")):
        assert torch.equal(test_images(*flags), reference)


def test_two_demos_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    same_second = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(train_demo, "datetime", SimpleNamespace(datetime=SimpleNamespace(now=lambda: same_second)))
    folders = [train_demo._claim_new_demo_folder(tmp_path) for _ in range(3)]
    assert [folder.name for folder in folders] == ["demo-20260102-030405", "demo-20260102-030405-2",
                                                   "demo-20260102-030405-3"]
