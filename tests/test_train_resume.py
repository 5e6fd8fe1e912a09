"""A run's lifecycle: interrupted anywhere and resumed, it ends bit-identical to an uninterrupted run; stops and
failures leave a folder that can be resumed or rerun, and say so in one line."""
import errno
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from diffkd import eval as diffkd_eval
from diffkd import train
from diffkd.distill import Distiller
from diffkd.train import loop
from diffkd.train.tasks import ClassificationTask
from train_cli import (assert_clean_failure, common, data_dir, distill, read_summary,  # noqa: F401
                       run_cli, teacher_ckpt)

TIMING = {"epoch_time_s", "images_per_s"}


def assert_same_run(straight: Path, resumed: Path) -> None:
    """Weights, optimizer state and every non-timing summary value are identical."""
    a = torch.load(straight / "last.pth", weights_only=True)
    b = torch.load(resumed / "last.pth", weights_only=True)
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"])
    for part in ("student", "heads"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    rows_a, rows_b = read_summary(straight), read_summary(resumed)
    assert [{k: v for k, v in row.items() if k not in TIMING} for row in rows_a] == \
           [{k: v for k, v in row.items() if k not in TIMING} for row in rows_b]


def interrupt_at(monkeypatch, *, micro_batch: int | None = None, evaluation: int | None = None, hard: bool = False):
    """Sends SIGINT to this process (a graceful stop) — or, with ``hard``, raises KeyboardInterrupt as a second
    Ctrl-C or a kill would — when the ``micro_batch``-th batch of this invocation is moved to the device (test
    batches count too), or when its ``evaluation``-th test pass starts."""
    counts = {"micro": 0, "eval": 0}
    to_device, evaluate = ClassificationTask.to_device, ClassificationTask.evaluate

    def fire():
        if hard:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)

    def counting_to_device(batch, device, channels_last):
        counts["micro"] += 1
        if counts["micro"] == micro_batch:
            fire()
        return to_device(batch, device, channels_last)

    def counting_evaluate(*args, **kwargs):
        counts["eval"] += 1
        if counts["eval"] == evaluation:
            fire()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(ClassificationTask, "to_device", staticmethod(counting_to_device))
    monkeypatch.setattr(ClassificationTask, "evaluate", staticmethod(counting_evaluate))


def test_interrupted_anywhere_and_resumed_the_run_is_bit_identical(data_dir, teacher_ckpt, tmp_path, capsys,
                                                                    monkeypatch):
    # 3 epochs of 3 optimizer steps, each of 2 micro-batches; a checkpoint after every step.
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--epochs": 3, "--seed": 7, "--lr": 0.02, "-b": 16,
                                                         "--grad-accum-steps": 2, "--checkpoint-interval": 1})
    assert run_cli(train, [*argv, "--experiment", "straight"], capsys)[0] == 0
    folder = tmp_path / "cut"
    resume = ["--resume", folder]
    stops = [
        # Ctrl-C in the middle of an accumulation (the first micro-batch of step 2): the step finishes, then it
        # stops.
        (dict(micro_batch=1), "stopped at epoch 1, step 2"),
        # Ctrl-C while epoch 2 is being tested (this invocation's test passes: epoch 1's, then epoch 2's).
        (dict(evaluation=2), "stopped at epoch 2, step 3"),
        # A hard interrupt mid-accumulation in epoch 3's step 2 (after epoch 2's 2 test batches and step 1's 2
        # micro-batches): the last checkpoint, after step 1, is used.
        (dict(micro_batch=6, hard=True), "the last checkpoint (epoch 3, step 1)"),
    ]
    code, out, err = run_cli(train, [*argv, "--experiment", "cut", "--max-steps", 1], capsys)
    assert code == 0 and "stopped at --max-steps 1, at epoch 1, step 1" in out
    for where, message in stops:
        with monkeypatch.context() as patch:
            interrupt_at(patch, **where)
            code, out, err = run_cli(train, resume, capsys)
        assert code == 130, err
        assert message in err and f"continue with: python -m diffkd.train --resume {folder}" in err, err
        assert "Traceback" not in err
        last_logged = (folder / "log.txt").read_text().strip().splitlines()[-1]
        assert ("interrupted at once" in last_logged) == where.get("hard", False), last_logged
    code, out, err = run_cli(train, resume, capsys)
    assert code == 0, err
    assert_same_run(tmp_path / "straight", folder)
    log = (folder / "log.txt").read_text()
    assert log.count("epoch 3/3: train loss") == 1 and "final: last-epoch top-1" in log


def test_max_steps_is_never_saved_and_the_schedule_stays_on_the_epochs(data_dir, tmp_path, capsys):
    argv = common(data_dir, tmp_path, **{"--method": "none", "--epochs": 2, "--sched": "multistep",
                                         "--decay-milestones": 1, "--lr": 0.1})
    assert run_cli(train, [*argv, "--experiment", "straight"], capsys)[0] == 0
    assert run_cli(train, [*argv, "--experiment", "cut", "--max-steps", 4], capsys)[0] == 0
    assert "max_steps" not in yaml.safe_load((tmp_path / "cut" / "args.yaml").read_text())
    code, out, _ = run_cli(train, ["--resume", tmp_path / "cut"], capsys)  # runs to the end, not one more step
    assert code == 0 and "final: last-epoch" in out
    rows = read_summary(tmp_path / "cut")
    assert [(row["epoch"], float(row["lr"])) for row in rows] == [("1", 0.1), ("2", pytest.approx(0.01))]
    assert_same_run(tmp_path / "straight", tmp_path / "cut")


def test_resume_refuses_another_thread_count_or_device(data_dir, tmp_path, capsys):
    argv = common(data_dir, tmp_path, **{"--method": "none", "--experiment": "run", "--max-steps": 1,
                                         "--threads": 1})
    assert run_cli(train, argv, capsys)[0] == 0
    code, _, err = run_cli(train, ["--resume", tmp_path / "run", "--threads", 2], capsys)
    assert_clean_failure(code, err, "threads (saved 1, given 2)", "bit-identically")
    code, out, err = run_cli(train, ["--resume", tmp_path / "run", "--threads", 1, "--device", "cpu"], capsys)
    assert code == 0, err


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed_or_rerun(data_dir, teacher_ckpt, tmp_path,
                                                                             capsys, monkeypatch):
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--experiment": "run"})
    with monkeypatch.context() as patch:
        interrupt_at(patch, evaluation=1, hard=True)  # during the teacher's test pass, before any step
        code, _, err = run_cli(train, argv, capsys)
    assert code == 130 and "no checkpoint was written yet" in err and "rerun the same command" in err
    assert not (tmp_path / "run" / "last.pth").exists()
    code, out, err = run_cli(train, ["--resume", tmp_path / "run"], capsys)
    assert code == 0, err
    assert "holds no checkpoint" in out and "final: last-epoch" in out
    with monkeypatch.context() as patch:
        interrupt_at(patch, evaluation=1, hard=True)
        assert run_cli(train, [*argv[:-1], "rerun"], capsys)[0] == 130
    code, _, err = run_cli(train, [*argv[:-1], "rerun"], capsys)  # the same command again takes the folder over
    assert code == 0, err
    assert (tmp_path / "rerun" / "log.txt").read_text().count("run ") >= 2  # both starts are in the log


def test_backend_triton_on_a_cpu_is_one_line_and_writes_nothing(data_dir, teacher_ckpt, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # as on a user's machine: no interpreter
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--experiment": "run", "--backend": "triton"})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "--backend triton", "CUDA GPU", "--backend auto")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_folder_resumes(data_dir, tmp_path, capsys,
                                                                            monkeypatch):
    argv = common(data_dir, tmp_path, **{"--method": "none", "--epochs": 2, "--experiment": "run"})
    real_save, saves = loop.save_atomically, []

    def save_until_full(content, path):
        saves.append(path)
        if content["epoch"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(content, path)

    monkeypatch.setattr(loop, "save_atomically", save_until_full)
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "No space left on device", "the last checkpoint (the end of epoch 1)",
                         f"--resume {tmp_path / 'run'}")
    monkeypatch.setattr(loop, "save_atomically", real_save)
    code, out, err = run_cli(train, ["--resume", tmp_path / "run"], capsys)
    assert code == 0 and "final: last-epoch" in out, err


def test_an_unexpected_exception_shows_its_traceback_and_where_the_log_is(data_dir, tmp_path, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop.Trainer, "_close_epoch", broken)
    code, _, err = run_cli(train, common(data_dir, tmp_path, **{"--method": "none", "--experiment": "run"}), capsys)
    log = tmp_path / "run" / "log.txt"
    assert code == 1 and "Traceback" in err and "RuntimeError: a bug" in err
    assert f"the run's log, with this traceback, is {log}" in err
    assert "RuntimeError: a bug" in log.read_text()


def test_fp16_overflows_are_counted_not_fatal(data_dir, teacher_ckpt, tmp_path, capsys, monkeypatch):
    original_forward, calls = Distiller.forward, []

    def overflow_once(self, images, targets):
        out = original_forward(self, images, targets)
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(Distiller, "forward", overflow_once)
    argv = distill(data_dir, tmp_path, teacher_ckpt, "kd", **{"--amp": True, "--amp-dtype": "float16",
                                                              "--experiment": "run"})
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    assert "skipped 1 step(s)" in out
    assert read_summary(tmp_path / "run")[0]["skipped_steps"] == "1"


def test_a_relative_teacher_path_resumes_from_anywhere_and_a_moved_teacher_is_found_by_content(
        data_dir, teacher_ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "start").mkdir()
    local_teacher = tmp_path / "start" / "teacher.pth"
    local_teacher.write_bytes(teacher_ckpt.read_bytes())
    monkeypatch.chdir(tmp_path / "start")
    argv = distill(data_dir, tmp_path, "teacher.pth", **{"--experiment": "run", "--max-steps": 1, "--epochs": 2})
    assert run_cli(train, argv, capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    assert run_cli(train, ["--resume", tmp_path / "run", "--max-steps", 1], capsys)[0] == 0
    moved = tmp_path / "moved.pth"
    local_teacher.rename(moved)
    code, _, err = run_cli(train, ["--resume", tmp_path / "run"], capsys)
    assert_clean_failure(code, err, "teacher file", "is missing", "--teacher-ckpt NEW_PATH")
    other = tmp_path / "other.pth"
    content = moved.read_bytes()
    other.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    code, _, err = run_cli(train, ["--resume", tmp_path / "run", "--teacher-ckpt", other], capsys)
    assert_clean_failure(code, err, "is not the teacher this run was trained with")
    code, _, err = run_cli(train, ["--resume", tmp_path / "run", "--teacher-ckpt", moved], capsys)
    assert code == 0, err


def test_the_demo_resumes_skipping_finished_runs(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFKD_CACHE", str(tmp_path / "cache"))
    argv = ["--demo", "--data-dir", data_dir, "--output", tmp_path, "--experiment", "demo", "--train-subset", 40,
            "--demo-teacher-subset", 40, "--epochs", 1, "-b", 8, "--demo-seeds", 0, "--eval-interval", 1]
    code, out, err = run_cli(train, [*argv, "--max-steps", 2], capsys)
    assert code == 0, err
    folder = tmp_path / "demo"
    assert "smoke numbers" in (folder / "results.txt").read_text()
    with monkeypatch.context() as patch:
        interrupt_at(patch, micro_batch=6)  # the teacher finishes (3 steps, 2 test batches); the next run stops
        code, _, err = run_cli(train, ["--demo", "--resume", "--output", tmp_path], capsys)
    assert code == 130 and f"continue with: python -m diffkd.train --demo --resume {folder}" in err, err
    code, out, err = run_cli(train, ["--demo", "--resume", "--output", tmp_path], capsys)
    assert code == 0, err
    assert "continuing the interrupted run" in out
    assert "smoke numbers" not in (folder / "results.txt").read_text()
    code, out, err = run_cli(train, ["--demo", "--resume", folder], capsys)
    assert code == 0 and out.count("finished earlier, skipped") == 2, out  # the teacher comes from the cache
    # the table's wall time sums every invocation, the interrupted one included
    assert len((folder / "wall_times.txt").read_text().split()) == 4 and " s over 4 invocations; " in out
    code, out, err = run_cli(diffkd_eval, [folder / "none-seed0" / "last.pth", "--export", tmp_path / "s.pth",
                                           "--no-eval"], capsys)
    assert code == 0, err


def test_resume_alone_continues_the_latest_run_by_its_folder_name(data_dir, tmp_path, capsys):
    for name in ("older", "newer"):
        argv = common(data_dir, tmp_path, **{"--method": "none", "--experiment": name, "--max-steps": 1})
        assert run_cli(train, argv, capsys)[0] == 0
    code, out, err = run_cli(train, ["--resume", "--output", tmp_path, "--max-steps", 1], capsys)
    assert code == 0, err
    assert f"continues the latest run in {tmp_path}: {tmp_path / 'newer'}" in out and "None" not in out
    assert "resumed at" in (tmp_path / "newer" / "log.txt").read_text()
    assert "resumed at" not in (tmp_path / "older" / "log.txt").read_text()


@pytest.mark.parametrize("recorded", [None, "absent"])
def test_a_detection_run_recorded_before_feature_norm_resumes_with_its_own_losses(tmp_path, recorded):
    """Runs recorded before --feature-norm existed trained on raw maps; today's detection default normalises.  A
    resumed old run keeps raw maps, while a run that recorded the setting (None: the task's default) keeps it."""
    from diffkd.train.cli import apply_recipe, build_parser
    from diffkd.train.resume import resolve_resume

    args = build_parser().parse_args(["--task", "detection", "--dataset", "fashion-scenes", "--method", "diffkd",
                                      "--student", "retinanet_resnet18_fpn", "--teacher", "retinanet_resnet34_fpn",
                                      "--threads", "1", "--device", "cpu"])
    apply_recipe(args)
    saved = vars(args)
    if recorded == "absent":
        del saved["feature_norm"]
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "args.yaml").write_text(yaml.safe_dump(saved))
    resume_args = build_parser().parse_args(["--resume", str(run)])
    merged, checkpoint, _ = resolve_resume(resume_args, set())
    assert checkpoint is None
    assert merged.feature_norm == ("none" if recorded == "absent" else None)
