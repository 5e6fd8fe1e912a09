"""diffkd.diagnose on a tiny DiffKD run trained by the trainer (the fixtures of test_train.py)."""
import csv
import math

import pytest
import torch
from PIL import Image

from diffkd import DiffKDHead, diagnose, load_official_state_dict
from diffkd import eval as diffkd_eval
from diffkd import train
from diffkd.data import build_datasets, build_loader
from diffkd.models import FeatureLogitTaps, create_model, default_taps, load_checkpoint, match_spatial
from test_train import data_dir, distill, run_cli, teacher_ckpt  # noqa: F401  (fixtures)

NFES = (1, 2, 3, 5)


@pytest.fixture(scope="module")
def trained_run(data_dir, teacher_ckpt, tmp_path_factory):  # noqa: F811
    """A DiffKD run (both heads, NFE 5) trained for one epoch; its checkpoint and the test batches."""
    output = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    argv = [str(a) for a in distill(data_dir, output, teacher_ckpt, "diffkd", **{"--experiment": "run",
                                                                                 "--threads": 1})]
    assert train.main(argv) == 0
    torch.set_num_threads(threads)
    checkpoint = torch.load(output / "run" / "last.pth", weights_only=True)
    _, val_ds, info = build_datasets("fashion-mnist", data_dir)
    batches = list(build_loader(val_ds, 10, train=False))  # 24 test images: batches of 10, 10 and 4
    return checkpoint, batches, info, output / "run" / "last.pth"


@pytest.fixture(scope="module")
def diagnoses(trained_run):
    checkpoint, batches, info, _ = trained_run
    return diagnose.diagnose_checkpoint(checkpoint, batches=batches, info=info, nfes=NFES, seed=3)


def _independent_kd_losses(checkpoint, batches, seed):
    """Per head: the test-set mean of the head's own forward ``kd_loss`` (eval mode, blend noise fixed as the
    diagnosis draws it), and Σ‖denoised − target‖² / Σ‖target‖², from models and heads built here."""
    run_args = checkpoint["args"]
    student = create_model(run_args["student"], num_classes=10, in_chans=1)
    student.load_state_dict(checkpoint["student"])
    teacher = create_model(run_args["teacher"], num_classes=10, in_chans=1)
    load_checkpoint(teacher, run_args["teacher_ckpt"])
    taps = {role: FeatureLogitTaps(model, default_taps(run_args[role], model, (1, 28, 28))[0])
            for role, model in (("student", student), ("teacher", teacher))}
    heads = {}
    for name, kernel_size in (("feature", 3), ("logit", 1)):
        state = {k[len(name) + 1:]: v for k, v in checkpoint["heads"].items() if k.startswith(name + ".")}
        width, student_channels = state["trans.weight"].shape[:2]
        head = DiffKDHead(student_channels, width, kernel_size=kernel_size, temperature=run_args["kd_temperature"],
                          distance="mse" if name == "feature" else run_args["logit_distance"])
        heads[name] = load_official_state_dict(head, state)
    totals = {name: [0.0, 0.0, 0.0, 0] for name in heads}  # Σ kd·B, Σ‖error‖², Σ‖target‖², images
    with torch.no_grad():
        for model in (student, teacher, *heads.values()):
            model.eval()
        for index, (images, _) in enumerate(batches):
            inputs = {"logit": (student(images), teacher(images))}
            inputs["feature"] = match_spatial(taps["student"].feature, taps["teacher"].feature)
            for name, head in heads.items():
                s, t = inputs[name]
                noise_shape = (s.shape[0], head.width, *(s.shape[2:] or (1, 1)))
                out = head(s, t, blend_noise=diagnose.fixed_blend_noise(noise_shape, seed, index),
                           diffusion_noise=torch.zeros(noise_shape),
                           diffusion_t=torch.zeros(s.shape[0], dtype=torch.long))
                total = totals[name]
                total[0] += float(out["kd_loss"]) * s.shape[0]
                total[1] += float((out["denoised"] - out["target"]).double().square().sum())
                total[2] += float(out["target"].double().square().sum())
                total[3] += s.shape[0]
    return {name: (kd / images, error / energy) for name, (kd, error, energy, images) in totals.items()}


def test_one_row_per_nfe_and_finite_numbers(diagnoses):
    assert set(diagnoses) == {"feature", "logit"}
    for diagnosis in diagnoses.values():
        assert [row.nfe for row in diagnosis.nfe] == list(NFES)
        assert [row.trained for row in diagnosis.nfe] == [False, False, False, True]
        assert diagnosis.images == 24 and diagnosis.trained_nfe == 5
        assert [step.t for step in diagnosis.steps] == [400, 300, 200, 100, 0, -1]
        numbers = [diagnosis.gamma_mean, diagnosis.gamma_std, diagnosis.rel_error_before]
        numbers += [v for row in diagnosis.nfe for v in (row.kd_distance, row.rel_error)]
        numbers += [v for s in diagnosis.steps for v in (s.kd_distance, s.rel_error, s.clean_kd_distance,
                                                          s.clean_rel_error) if v is not None]
        assert all(math.isfinite(v) and v >= 0 for v in numbers)
        assert 0 < diagnosis.gamma_mean < 1
        # the last state of the trained chain is the trained NFE's output
        assert diagnosis.steps[-1].kd_distance == pytest.approx(diagnosis.nfe[-1].kd_distance, rel=1e-6)
        assert diagnosis.steps[-1].clean_kd_distance is None
        assert len({round(row.kd_distance, 9) for row in diagnosis.nfe}) == len(NFES)  # the NFE matters


def test_the_trained_nfe_row_is_the_heads_own_kd_loss_on_fixed_noises(trained_run, diagnoses):
    checkpoint, batches, _, _ = trained_run
    expected = _independent_kd_losses(checkpoint, batches, seed=3)
    for name, (kd_loss, rel_error) in expected.items():
        trained = next(row for row in diagnoses[name].nfe if row.trained)
        assert trained.kd_distance == pytest.approx(kd_loss, rel=1e-5), name
        assert trained.rel_error == pytest.approx(rel_error, rel=1e-5), name
    # another seed draws other blend noises, hence other distances
    checkpoint_, batches_, info, _ = trained_run
    other = diagnose.diagnose_checkpoint(checkpoint_, batches=batches_, info=info, nfes=(5,), seed=4)
    assert other["feature"].nfe[0].kd_distance != pytest.approx(expected["feature"][0], rel=1e-6)


def test_report_files_table_and_title(diagnoses, tmp_path):
    written = diagnose.write_report(diagnoses, tmp_path / "out", title="run seed 0: NFE diagnosis")
    assert [p.name for p in written] == ["nfe-diagnosis.json", "nfe-diagnosis.csv", "nfe-diagnosis.png"]
    with open(written[1]) as file:
        rows = list(csv.DictReader(file))
    assert [r["nfe_or_step"] for r in rows if r["head"] == "logit" and r["table"] == "nfe"] == ["1", "2", "3", "5"]
    assert len(rows) == 2 * (1 + len(NFES) + 6)
    with Image.open(written[2]) as image:
        assert image.text["Title"] == "run seed 0: NFE diagnosis"
    table = diagnose.format_tables(diagnoses)
    assert table.count("<- trained") == 2 and "feature head (mse distance, trained with 5 steps" in table
    assert "logit head (kl distance" in table


def test_refuses_runs_without_diffkd_and_bad_nfes(trained_run):
    checkpoint, batches, info, _ = trained_run
    kd_run = {**checkpoint, "args": {**checkpoint["args"], "method": "kd"}}
    with pytest.raises(ValueError, match="needs a DiffKD run; this checkpoint was trained with --method kd"):
        diagnose.diagnose_checkpoint(kd_run, batches=batches, info=info)
    with pytest.raises(ValueError, match="nfes must be positive integers"):
        diagnose.diagnose_checkpoint(checkpoint, batches=batches, info=info, nfes=(0, 5))
    moved = {**checkpoint, "args": {**checkpoint["args"], "teacher_ckpt": "/nonexistent/teacher.pth"}}
    with pytest.raises(ValueError, match="teacher checkpoint /nonexistent/teacher.pth does not exist"):
        diagnose.diagnose_checkpoint(moved, batches=batches, info=info)


def test_eval_diagnose_prints_the_tables_and_writes_the_report(trained_run, data_dir, tmp_path, capsys):  # noqa: F811
    path = trained_run[3]
    code, out, err = run_cli(diffkd_eval, [path, "--diagnose", tmp_path / "diagnosis", "--data-dir", data_dir,
                                           "--threads", 1, "-b", 12], capsys)
    assert code == 0, err
    assert "test top-1" in out and "feature head (mse distance, trained with 5 steps" in out
    assert out.count("<- trained") == 2
    assert sorted(p.name for p in (tmp_path / "diagnosis").iterdir()) == [
        "nfe-diagnosis.csv", "nfe-diagnosis.json", "nfe-diagnosis.png"]
    code, _, err = run_cli(diffkd_eval, [path, "--diagnose", "--no-eval", "--threads", 1], capsys)
    assert code == 2 and "--diagnose takes the last.pth / best.pth of a DiffKD run" in err


def test_eval_noise_gap_against_another_run_and_its_refusals(trained_run, data_dir, tmp_path, capsys):  # noqa: F811
    path = trained_run[3]
    code, out, err = run_cli(diffkd_eval, [path, "--noise-gap-against", path, "--data-dir", data_dir, "--threads", 1],
                             capsys)
    assert code == 0, err
    assert "read out linearly as the other run's student's" in out
    feature = next(line.split() for line in out.splitlines() if line.startswith("feature/raw"))
    assert float(feature[2]) < 1e-3 and float(feature[5]) == pytest.approx(1.0, abs=1e-3)  # a run against itself
    assert "feature/denoised" not in out  # students only: the heads belong to the teacher comparison
    code, _, err = run_cli(diffkd_eval, [path, "--noise-gap-against", tmp_path / "missing.pth"], capsys)
    assert code == 2 and "no checkpoint at" in err
    code, _, err = run_cli(diffkd_eval, [path, "--noise-gap", "--no-eval"], capsys)
    assert code == 2 and "without --no-eval" in err
