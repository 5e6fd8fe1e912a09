"""benchmarks/bench_accuracy.py with a fake trainer: resume, selection, the paired confidence interval, the report."""
import csv
import json
import math

import pytest
from PIL import Image

from benchmarks import bench_accuracy as bench


def _flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


class FakeTrainer:
    """Writes what ``python -m diffkd.train`` writes that the study reads: summary.csv (and last.pth)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def top1(experiment: str) -> float:
        variant, _, seed = experiment.rpartition("-seed")
        return 70.0 + list(bench.VARIANTS).index(variant) * 0.5 + int(seed) * 0.1 if variant else 80.0

    def __call__(self, argv, log_path):
        self.calls.append(list(argv))
        experiment = _flag(argv, "--experiment")
        folder = bench.Path(_flag(argv, "--output")) / experiment
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "last.pth").write_text("checkpoint")
        epochs = int(_flag(argv, "--epochs"))
        rows = [{"epoch": e, "val_top1": "" if e < epochs else self.top1(experiment)} for e in range(1, epochs + 1)]
        if _flag(argv, "--method") == "diffkd":
            for row in rows:
                row.update({"train_feature/gamma": 0.999, "train_feature/rel_error_before": 1.5,
                            "train_feature/rel_error_after": 0.3})
        with open(folder / "summary.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        if experiment != "teacher" and _flag(argv, "--method") != "none":
            (folder / "log.txt").write_text("teacher resnet14: top-1 82.08%, top-5 99.61% on 10000 test images\n")
        return 0


class FakeExporter:
    def __init__(self):
        self.calls = []

    def __call__(self, argv, log_path):
        self.calls.append(list(argv))
        bench.Path(_flag(argv, "--export")).write_text("teacher weights")
        return 0


@pytest.fixture
def teacher(tmp_path):
    path = tmp_path / "teacher.pth"
    path.write_text("weights")
    return path


def run(tmp_path, argv, trainer, exporter=None):
    return bench.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "report" / "acc")],
                      train=trainer, evaluate=exporter or FakeExporter())


# ---- statistics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452),
                                          (1000, 1.9623)])
def test_t_quantile_matches_the_tables(df, expected):
    assert bench.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert bench.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_paired_difference_on_fixed_numbers():
    better = {0: 75.0, 1: 74.0, 2: 76.5}
    worse = {0: 74.0, 1: 74.5, 2: 75.0, 3: 70.0}  # seed 3 has no partner: left out
    d = bench.paired_difference(better, worse)
    # differences 1.0, -0.5, 1.5: mean 2/3, sample std sqrt(13/12), t(0.975, 2) = 4.302653
    std = math.sqrt(13 / 12)
    half_width = 4.302653 * std / math.sqrt(3)
    assert d.seeds == (0, 1, 2)
    assert (d.mean, d.std) == (pytest.approx(2 / 3), pytest.approx(std))
    assert (d.low, d.high) == (pytest.approx(2 / 3 - half_width, abs=1e-5), pytest.approx(2 / 3 + half_width,
                                                                                            abs=1e-5))
    assert not d.excludes_zero
    assert bench.paired_difference({0: 2.0, 1: 3.0, 2: 2.5}, {0: 1.0, 1: 1.5, 2: 1.4}).excludes_zero  # 1.2 ± 0.66
    single = bench.paired_difference({0: 2.0}, {0: 1.0, 1: 5.0})
    assert single.mean == 1.0 and math.isnan(single.low)
    assert bench.paired_difference({0: 1.0}, {1: 1.0}) is None


# ---- runs: resume and selection -----------------------------------------------------------------------------------
def test_finished_runs_are_not_redone(tmp_path, teacher):
    trainer = FakeTrainer()
    argv = ["--methods", "kd,diffkd", "--seeds", "0", "1", "--ablations", "nfe1", "--ablation-seeds", "0",
            "--teacher-ckpt", str(teacher)]
    assert run(tmp_path, argv, trainer) == 0
    assert sorted(_flag(c, "--experiment") for c in trainer.calls) == [
        "diffkd-nfe1-seed0", "diffkd-seed0", "diffkd-seed1", "kd-seed0", "kd-seed1"]
    assert all(_flag(c, "--teacher-ckpt") == str(teacher) and _flag(c, "--threads") == "1" for c in trainer.calls)
    nfe1 = next(c for c in trainer.calls if _flag(c, "--experiment") == "diffkd-nfe1-seed0")
    assert _flag(nfe1, "--nfe") == "1" and _flag(nfe1, "--method") == "diffkd"
    again = FakeTrainer()
    assert run(tmp_path, [*argv, "--methods", "none,kd,diffkd"], again) == 0
    assert [_flag(c, "--experiment") for c in again.calls] == ["none-seed0", "none-seed1"]
    assert "--teacher" not in again.calls[0]  # the student alone has no teacher


def test_an_interrupted_run_is_resumed_and_a_run_without_checkpoint_restarts(tmp_path, teacher):
    runs = tmp_path / "work" / "runs"
    (runs / "kd-seed0").mkdir(parents=True)
    (runs / "kd-seed0" / "last.pth").write_text("epoch 2 of 5")
    (runs / "kd-seed0" / "summary.csv").write_text("epoch,val_top1\n1,\n2,\n")
    (runs / "kd-seed1").mkdir()
    (runs / "kd-seed1" / "partial.txt").write_text("crashed before its first checkpoint")
    trainer = FakeTrainer()
    assert run(tmp_path, ["--methods", "kd", "--seeds", "0", "1", "--ablations", "none", "--teacher-ckpt",
                          str(teacher)], trainer) == 0
    resumed = {_flag(c, "--experiment"): _flag(c, "--resume") for c in trainer.calls}
    assert resumed == {"kd-seed0": str(runs / "kd-seed0"), "kd-seed1": None}
    assert not (runs / "kd-seed1" / "partial.txt").exists()


def test_the_teacher_is_trained_once_and_exported(tmp_path):
    trainer, exporter = FakeTrainer(), FakeExporter()
    argv = ["--methods", "kd", "--seeds", "0", "--ablations", "none"]
    assert run(tmp_path, argv, trainer, exporter) == 0
    teacher_call = trainer.calls[0]
    assert (_flag(teacher_call, "--experiment"), _flag(teacher_call, "--student"), _flag(teacher_call, "--method"),
            _flag(teacher_call, "--train-subset"), _flag(teacher_call, "--epochs")) == (
        "teacher", "resnet14", "none", "24000", "1")
    exported = tmp_path / "work" / "teacher.pth"
    assert exporter.calls == [[str(tmp_path / "work" / "runs" / "teacher" / "last.pth"), "--export", str(exported),
                               "--no-eval"]]
    assert _flag(trainer.calls[1], "--teacher-ckpt") == str(exported)
    again = FakeTrainer()
    assert run(tmp_path, [*argv, "--seeds", "0", "1"], again, exporter) == 0
    assert [_flag(c, "--experiment") for c in again.calls] == ["kd-seed1"] and len(exporter.calls) == 1


def test_selection_flags_and_quick():
    args = bench.parse_args(["--methods", "none,diffkd", "--seeds", "3", "4", "--ablations", "no-anm,logit",
                             "--ablation-seeds", "7"])
    assert [s.name for s in bench.selected_runs(args)] == [
        "none-seed3", "diffkd-seed3", "none-seed4", "diffkd-seed4", "diffkd-no-anm-seed7", "diffkd-logit-seed7"]
    default = bench.selected_runs(bench.parse_args([]))
    assert len(default) == 5 * 10 + 7 * 5
    quick = bench.parse_args(["--quick"])
    assert [s.name for s in bench.selected_runs(quick)] == [
        "none-seed0", "kd-seed0", "diffkd-seed0", "none-seed1", "kd-seed1", "diffkd-seed1"]
    assert quick.work_dir.name == "bench-accuracy-quick" and quick.out.name == "accuracy-fashion-mnist-quick"


@pytest.mark.parametrize("argv, message", [(["--methods", "kd,fitnet"], "--methods: unknown fitnet"),
                                           (["--ablations", "nfe3"], "--ablations: unknown nfe3"),
                                           (["--jobs", "0"], "--jobs must be >= 1")])
def test_bad_selections_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_work_folder_of_other_settings_is_refused(tmp_path, teacher, capsys):
    argv = ["--methods", "kd", "--seeds", "0", "--ablations", "none", "--teacher-ckpt", str(teacher)]
    assert run(tmp_path, argv, FakeTrainer()) == 0
    trainer = FakeTrainer()
    assert run(tmp_path, [*argv, "--epochs", "3"], trainer) == 2
    assert "epochs: saved 5, asked 3" in capsys.readouterr().err and not trainer.calls


# ---- the report ----------------------------------------------------------------------------------------------------
def test_report_tables_interval_chart_and_json(tmp_path, teacher):
    argv = ["--methods", "none,kd,diffkd", "--seeds", "0", "1", "2", "--ablations", "no-anm,feature",
            "--ablation-seeds", "0", "1", "--teacher-ckpt", str(teacher), "--note", "code: test"]
    assert run(tmp_path, argv, FakeTrainer()) == 0
    prefix = tmp_path / "report" / "acc"
    payload = json.loads(prefix.with_suffix(".json").read_text())
    top1 = FakeTrainer.top1
    diffkd = payload["variants"]["diffkd"]
    assert diffkd["top1"] == {str(s): top1(f"diffkd-seed{s}") for s in range(3)}
    # every seed's difference from KD is the same (+3 × 0.5): zero spread, a zero-width interval
    assert diffkd["vs_kd"]["mean"] == pytest.approx(1.5) and diffkd["vs_kd"]["low"] == pytest.approx(1.5)
    assert payload["variants"]["diffkd-feature"]["vs_kd"]["seeds"] == [0, 1]
    assert diffkd["diagnostics"] == {"feature/gamma": 0.999, "feature/rel_error_before": 1.5,
                                     "feature/rel_error_after": 0.3}
    claims = {(t["better"], t["worse"]) for t in payload["trends"]}
    assert claims == {("diffkd", "none"), ("diffkd", "diffkd-no-anm"), ("diffkd-feature", "none"),
                      ("diffkd", "diffkd-feature")}
    markdown = prefix.with_suffix(".md").read_text()
    assert "| diffkd: DiffKD, feature + logit heads, NFE 5 | 3 | 72.10 ± 0.10 | 72.00, 72.10, 72.20 | " \
           "+1.50 [+1.50, +1.50] (excludes 0) |" in markdown
    assert "Teacher resnet14 (one epoch on 24000 images, test top-1 82.08)" in markdown
    assert markdown.count("code: test") == 1 and "--note" not in markdown
    assert "| diffkd | 0.999 | 1.500 → 0.300 | – | – |" in markdown
    with Image.open(prefix.with_suffix(".png")) as image:
        assert "test top-1 per seed" in image.text["Title"]


def test_report_only_with_nothing_finished_says_so(tmp_path, capsys):
    assert run(tmp_path, ["--report-only"], FakeTrainer()) == 2
    assert "no finished run" in capsys.readouterr().err
