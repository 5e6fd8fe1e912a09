"""benchmarks/bench_gap.py and its report with a fake trainer: the plan, provenance, teachers, Holm, the report."""
import csv
import hashlib
import json
import math

import pytest

from benchmarks import bench_gap as bench
from benchmarks import gap_report as report


def _flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


class FakeTrainer:
    """Writes the summary.csv that ``python -m diffkd.train`` writes, with a made-up top-1 per run."""

    def __init__(self, gains=None):
        self.calls, self.gains = [], gains or {}

    def __call__(self, argv, log_path):
        self.calls.append(list(argv))
        experiment = _flag(argv, "--experiment")
        folder = bench.Path(_flag(argv, "--output")) / experiment
        folder.mkdir(parents=True, exist_ok=True)
        variant, _, seed = experiment.rpartition("-seed")
        top1 = 85.0 + self.gains.get(variant, 0.0) + (0.3 * (int(seed) % 3) if seed.isdigit() else 0)
        row = {"epoch": _flag(argv, "--epochs"), "val_top1": top1}
        if _flag(argv, "--method") == "diffkd":
            row["train_feature/gamma"] = 0.99 - 0.01 * int(seed)
        with open(folder / "summary.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
        if _flag(argv, "--teacher"):
            (folder / "log.txt").write_text(f"teacher {_flag(argv, '--teacher')}: top-1 91.24%, top-5 99.9%\n")
        return 0


def _exporter(argv, log_path):
    bench.Path(_flag(argv, "--export")).write_text("teacher weights")
    return 0


def _args(tmp_path, *extra):
    return [*extra, "--work-dir", str(tmp_path / "work"), "--no-report"]


def test_plan_runs_main_arm_then_gap_arm_then_ablations_in_order(tmp_path):
    trainer = FakeTrainer()
    code = bench.main(_args(tmp_path, "--seeds", "0-1", "--more-seeds", "2", "--extra-seeds", "3",
                            "--gap-seeds", "0,1", "--ablation-seeds", "0", "--ablations", "diffkd-pca32"),
                      train=trainer, evaluate=_exporter)
    assert code == 0
    order = [_flag(c, "--experiment") for c in trainer.calls]
    # teachers trained by the study's recipe (3 and 6 epochs on all images) before their arm's first run
    assert order[0] == "teacher-resnet14-3ep" and _flag(trainer.calls[0], "--epochs") == "3"
    assert order[1:9] == [f"{m}-seed{s}" for s in (0, 1) for m in ("none", "kd", "mse", "diffkd")]
    assert "none-seed3" not in order  # identical fake seeds: DiffKD − MSE has no spread, seed 3 is not needed
    gap_start = order.index("teacher-resnet56-6ep")
    assert _flag(trainer.calls[gap_start], "--epochs") == "6"
    assert order[gap_start + 1:gap_start + 5] == ["mse-seed0", "diffkd-seed0", "mse-seed1", "diffkd-seed1"]
    assert order[-1] == "diffkd-pca32-seed0" and "--compression" in trainer.calls[-1]
    assert bench.main(_args(tmp_path, "--seeds", "0-1", "--more-seeds", "2", "--extra-seeds", "3",
                            "--gap-seeds", "0,1", "--ablation-seeds", "0", "--ablations", "diffkd-pca32"),
                      train=trainer, evaluate=_exporter) == 0
    assert len(trainer.calls) == len(order)  # resumable: finished runs are not redone


def test_extra_seeds_run_when_the_spread_of_diffkd_minus_mse_is_large(tmp_path):
    trainer = FakeTrainer()
    original = trainer.__call__

    def noisy(argv, log_path):  # DiffKD's seeds differ by whole points: a spread above 0.6
        code = original(argv, log_path)
        experiment = _flag(argv, "--experiment")
        if experiment.startswith("diffkd-seed"):
            path = bench.Path(_flag(argv, "--output")) / experiment / "summary.csv"
            rows = list(csv.DictReader(open(path)))
            rows[0]["val_top1"] = str(80 + 2 * int(experiment[-1]))
            with open(path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        return code

    assert bench.main(_args(tmp_path, "--teacher-ckpt", str(_teacher(tmp_path)), "--seeds", "0-2", "--more-seeds", "",
                            "--extra-seeds", "3", "--gap-seeds", "", "--ablations", ""),
                      train=noisy, evaluate=_exporter) == 0
    assert "diffkd-seed3" in [_flag(c, "--experiment") for c in trainer.calls]


def _teacher(tmp_path):
    path = tmp_path / "t14.pth"
    path.write_bytes(b"weights")
    return path


def test_each_launch_records_its_provenance(tmp_path):
    teacher = _teacher(tmp_path)
    assert bench.main(_args(tmp_path, "--teacher-ckpt", str(teacher), "--seeds", "0", "--more-seeds", "",
                            "--gap-seeds", "", "--ablations", ""), train=FakeTrainer(), evaluate=_exporter) == 0
    launches = json.loads((tmp_path / "work" / "main" / "provenance" / "kd-seed0.json").read_text())
    assert len(launches) == 1
    launch = launches[0]
    assert launch["command"].startswith("python -m diffkd.train") and "--method kd" in launch["command"]
    assert launch["precision"] == "float32" and launch["threads"] == 1 and launch["torch"]
    assert launch["cpu_model"] and launch["commit"]
    assert launch["teacher_sha256"] == hashlib.sha256(b"weights").hexdigest()
    none = json.loads((tmp_path / "work" / "main" / "provenance" / "none-seed0.json").read_text())[0]
    assert none["teacher_sha256"] is None  # the student alone has no teacher


def test_a_missing_teacher_file_fails_its_stage_and_the_others_still_run(tmp_path, capsys):
    trainer = FakeTrainer()
    code = bench.main(_args(tmp_path, "--teacher-ckpt", str(_teacher(tmp_path)), "--seeds", "0", "--more-seeds", "",
                            "--gap-seeds", "0", "--gap-teacher-ckpt", str(tmp_path / "missing.pth"),
                            "--ablation-seeds", "0", "--ablations", "diffkd-nfe1"), train=trainer, evaluate=_exporter)
    assert code == 1 and "missing.pth does not exist" in capsys.readouterr().err
    assert _flag(trainer.calls[-1], "--experiment") == "diffkd-nfe1-seed0"


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--ablations", "diffkd-svd"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "a-b"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--gap-teacher-epochs", "0"])
    assert bench._seeds("0-2,5") == (0, 1, 2, 5)


def test_every_ablation_is_compared_and_every_comparison_names_a_study_run():
    compared = {(arm, v) for _, arm_a, a, arm_b, b, _ in report.COMPARISONS for arm, v in ((arm_a, a), (arm_b, b))}
    assert {v for _, v in compared} >= set(bench.ABLATIONS)
    assert all(v in bench.ARMS[arm][1] or (arm == "main" and v in bench.ABLATIONS) for arm, v in compared)
    assert len({c[0] for c in report.COMPARISONS}) == len(report.COMPARISONS)


def test_holm_adjusts_in_order_and_caps_at_one():
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert math.isnan(report.p_value([1.0]))
    assert report.p_value([1.0, 1.2, 0.8, 1.1]) < 0.01


def test_report_answers_only_what_was_measured(tmp_path):
    gains = {"diffkd": 1.0, "mse": 0.5, "kd": 0.2}
    argv = _args(tmp_path, "--teacher-ckpt", str(_teacher(tmp_path)), "--gap-teacher-ckpt", str(_teacher(tmp_path)),
                 "--seeds", "0-2", "--more-seeds", "", "--gap-seeds", "0-2", "--ablations", "")
    assert bench.main(argv, train=FakeTrainer(gains), evaluate=_exporter) == 0
    out = tmp_path / "report" / "gap"
    markdown = report.write(tmp_path / "work", out, measure_noise=False)
    payload = json.loads(out.with_suffix(".json").read_text())
    names = [c["name"] for c in payload["comparisons"]]
    assert names[:3] == ["DiffKD − MSE, main", "DiffKD − MSE, gap", "difference of gains (gap − main)"]
    first = payload["comparisons"][0]
    assert first["mean"] == pytest.approx(0.5) and len(first["seeds"]) == 3
    assert payload["holm_family_size"] == len(names)
    assert "Holm's correction over those" in markdown and "91.24" in markdown
    assert "Caveat: the gap arm's teacher (91.24) is not more accurate" in markdown  # both fake teachers: 91.24
    assert report.teacher_caveat({"main": "91.24", "gap": "92.10"}) == ""
    assert report.teacher_caveat({"main": "91.24", "gap": "not measured"}) == ""
    assert "1. Does the noise gap grow with the capacity gap? Not measured" in markdown
    assert "3. Does γ track the noise gap? Not measured" in markdown
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert payload["runs"]["main"]["kd"]["0"]["provenance"][0]["threads"] == 1


def test_report_pairs_seeds_for_the_seed_to_seed_reference(tmp_path, monkeypatch):
    argv = _args(tmp_path, "--teacher-ckpt", str(_teacher(tmp_path)), "--seeds", "0-2", "--more-seeds", "",
                 "--gap-seeds", "", "--ablations", "")
    assert bench.main(argv, train=FakeTrainer(), evaluate=_exporter) == 0

    def gaps(one_minus_r2):
        return {"feature/raw": {"student_to_teacher": {"one_minus_r2": one_minus_r2, "snr": 1.0}, "cka": 0.5}}

    paired = []
    monkeypatch.setattr(report, "noise_gap", lambda folder, teacher, batches: gaps(0.4))
    monkeypatch.setattr(report, "seed_to_seed", lambda folder, other, batches: paired.append(
        (folder.name, other.name)) or gaps(0.25))
    markdown = report.write(tmp_path / "work", tmp_path / "report" / "gap")
    # disjoint pairs: seed 2 has no seed 3 yet, and seed 1 is already paired with seed 0
    assert sorted(paired) == sorted((f"{v}-seed0", f"{v}-seed1") for v in ("none", "kd", "mse", "diffkd"))
    assert "| main | none | resnet14 | 3 | 0.400 |" in markdown and "| main | none | next seed | 1 | 0.250 |" in markdown
    assert markdown.index("| main | none | resnet14 |") < markdown.index("| main | none | next seed |")
    assert "two seeds of the student alone leave 0.250 of each other's feature unexplained (1 pair(s)" in markdown


def test_gamma_is_compared_across_teachers_by_seed_and_correlated_only_within_an_arm():
    def run(gamma, one_minus_r2, teacher):
        return {"top1": 89.0, "gamma": {"feature": gamma},
                "noise_gap": {teacher: {report.NOISE_POINT: {"student_to_teacher": {"one_minus_r2": one_minus_r2}}}}}

    teachers = {"main": "resnet14", "gap": "resnet56"}
    # Within each arm γ rises with the noise gap; across arms it falls as the gap grows.  Pooling would mix the two.
    table = {"main": {"diffkd": {s: run(0.992 + 0.001 * s, 0.36 + 0.01 * s, "resnet14") for s in range(3)}},
             "gap": {"diffkd": {s: run(0.989 + 0.001 * s, 0.42 + 0.01 * s, "resnet56") for s in range(2)}}}
    answer = report._gamma_answer(table, teachers)
    assert "paired by seed (2 seed(s))" in answer
    assert "1 − R² to its teacher changes by +0.060" in answer and "γ by -0.0030" in answer
    assert "Within the main arm, Pearson r = +1.00" in answer and "over 3 runs" in answer
    assert "Within the gap arm" not in answer  # two runs are too few for a correlation
    no_common_seed = {"main": table["main"], "gap": {"diffkd": {7: table["gap"]["diffkd"][0]}}}
    assert "paired by seed" not in report._gamma_answer(no_common_seed, teachers)
    assert report._gamma_answer({"main": {"diffkd": {}}}, {"main": "resnet14"}).startswith("Not measured: 0 DiffKD")
