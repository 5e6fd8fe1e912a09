"""benchmarks/bench_dense.py with a fake trainer: teachers once, resume, seed-ordered runs, paired differences, the
loss balance and the report."""
import csv
import json
import math

import pytest
from PIL import Image

from benchmarks import bench_dense as bench


def _flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


class FakeTrainer:
    """Writes what ``python -m diffkd.train`` writes that the study reads: summary.csv (and last.pth). The metric
    is 10 + 2·(method index) + 0.1·seed, so every difference from the student alone is exact; the distillation
    terms are 3× the task loss in epoch 1 and 1× in the last, half of them KD terms."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def __call__(self, argv, log_path):
        self.calls.append(list(argv))
        experiment, task = _flag(argv, "--experiment"), _flag(argv, "--task")
        if experiment == self.fail:
            return 1
        folder = bench.Path(_flag(argv, "--output")) / experiment
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "last.pth").write_text("checkpoint")
        epochs, method = int(_flag(argv, "--epochs")), _flag(argv, "--method")
        metric, second = bench.TASKS[task].metric, bench.TASKS[task].second_metric
        value = 10 + 2 * list(bench.METHODS[task]).index(method) + 0.1 * int(_flag(argv, "--seed"))
        task_loss = f"train_{bench.TASKS[task].task_loss}"
        rows = []
        for epoch in range(1, epochs + 1):
            ratio = 0 if method == "none" else (3 if epoch == 1 else 1)
            rows.append({"epoch": epoch, task_loss: 0.5, "train_loss": 0.5 * (1 + ratio),
                         "train_head/kd_loss": 0.25 * ratio,  # half of the distillation terms
                         f"val_{metric}": value if epoch == epochs else "",
                         f"val_{second}": 2 * value if epoch == epochs else ""})
        with open(folder / "summary.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        return 0


class FakeExporter:
    def __call__(self, argv, log_path):
        bench.Path(_flag(argv, "--export")).write_text("teacher weights")
        return 0


def run(tmp_path, argv, trainer):
    return bench.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "report" / "dense")],
                      train=trainer, evaluate=FakeExporter())


def test_the_study_trains_each_teacher_once_runs_seed_by_seed_and_reports_paired_differences(tmp_path):
    trainer = FakeTrainer()
    assert run(tmp_path, ["--seeds", "0", "1", "2"], trainer) == 0
    experiments = [_flag(argv, "--experiment") for argv in trainer.calls]
    assert experiments[:2] == ["detection-teacher", "segmentation-teacher"]
    assert experiments[2:9] == [f"{name}-seed0" for name in bench.VARIANTS]  # a whole seed before the next
    assert len(experiments) == 2 + 3 * 7
    student = trainer.calls[2 + 2]  # detection-diffkd-seed0
    assert _flag(student, "--teacher-ckpt") == str(tmp_path / "work" / "detection-teacher.pth")
    assert (_flag(student, "--image-size"), _flag(student, "--fpn-channels"), _flag(student, "--threads")) == \
           ("64", "64", "1")
    summary = json.loads((tmp_path / "report" / "dense.json").read_text())
    diffkd = summary["variants"]["segmentation-diffkd"]
    assert diffkd["miou"]["mean"] == pytest.approx(16.1) and diffkd["vs_none"]["mean"] == pytest.approx(6)
    assert diffkd["vs_none"]["std"] == pytest.approx(0, abs=1e-9)
    assert diffkd["loss_balance"] == {"first_epoch": {"all": pytest.approx(3), "kd": pytest.approx(1.5)},
                                      "last_epoch": {"all": pytest.approx(1), "kd": pytest.approx(0.5)}}
    assert [(c["better"], c["worse"], round(c["mean"], 6)) for c in summary["comparisons"]] == [
        ("detection-diffkd", "detection-mse", 2), ("segmentation-diffkd", "segmentation-dist", 2),
        ("segmentation-diffkd", "segmentation-kd", 4)]
    markdown = (tmp_path / "report" / "dense.md").read_text()
    assert "| diffkd: DiffKD on every FPN level | 3 | 14.10 ± 0.10 | 14.00, 14.10, 14.20 | +4.00 [+4.00, +4.00] " \
           "(excludes 0) | 28.20 ± 0.20 |" in markdown
    assert "| detection-mse | 3.00 | 1.50 | 1.00 | 0.50 |" in markdown
    with Image.open(tmp_path / "report" / "dense.png") as image:
        assert image.size[0] > 500 and image.size[1] > 500
    # Nothing left to do: a rerun trains nothing; a new seed trains only its own runs.
    again = FakeTrainer()
    assert run(tmp_path, ["--seeds", "0", "1", "2"], again) == 0 and again.calls == []
    assert run(tmp_path, ["--seeds", "3", "--tasks", "segmentation"], again) == 0
    assert [_flag(argv, "--experiment") for argv in again.calls] == [f"segmentation-{m}-seed3"
                                                                     for m in bench.METHODS["segmentation"]]


def test_an_interrupted_run_resumes_and_a_failure_is_reported_while_the_others_finish(tmp_path, capsys):
    trainer = FakeTrainer(fail="segmentation-kd-seed0")
    assert run(tmp_path, ["--seeds", "0", "--tasks", "segmentation"], trainer) == 1
    assert "run segmentation-kd-seed0 failed" in capsys.readouterr().err
    summary = json.loads((tmp_path / "report" / "dense.json").read_text())
    assert set(summary["variants"]) == {"segmentation-none", "segmentation-dist", "segmentation-diffkd"}
    folder = tmp_path / "work" / "runs" / "segmentation-kd-seed0"
    folder.mkdir(parents=True)
    (folder / "last.pth").write_text("checkpoint")
    retry = FakeTrainer()
    assert run(tmp_path, ["--seeds", "0", "--tasks", "segmentation"], retry) == 0
    assert [argv[-2:] for argv in retry.calls] == [["--resume", str(folder)]]


def test_quick_settings_and_a_changed_study_are_kept_apart(tmp_path, capsys):
    trainer = FakeTrainer()
    assert run(tmp_path, ["--quick"], trainer) == 0
    experiments = [_flag(argv, "--experiment") for argv in trainer.calls]
    assert experiments == ["detection-teacher", "segmentation-teacher", "detection-none-seed0",
                           "detection-diffkd-seed0", "segmentation-none-seed0", "segmentation-diffkd-seed0"]
    assert {_flag(argv, "--epochs") for argv in trainer.calls} == {"1"}
    assert math.isnan(json.loads((tmp_path / "report" / "dense.json").read_text())["variants"]["detection-none"]
                      ["map"]["std"])
    assert run(tmp_path, [], FakeTrainer()) == 2  # the work folder holds the quick study's settings
    assert "holds runs of other settings" in capsys.readouterr().err
