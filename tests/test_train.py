"""``python -m diffkd.train`` and ``python -m diffkd.eval`` end to end on a tiny generated Fashion-MNIST
(fixtures in train_cli.py); runs are a few steps of the smallest CIFAR-zoo networks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffkd import eval as diffkd_eval
from diffkd import train
from diffkd.distill import Distiller
from diffkd.models import create_model, load_checkpoint
from diffkd.train.build import lr_factor_schedule
from diffkd.train.cli import build_parser, parse_args
from diffkd.train.demo import CACHE_ENV
from train_cli import (REPO, assert_clean_failure, common, data_dir, distill, read_summary,  # noqa: F401
                       run_cli, teacher_ckpt)
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ---- every method, outputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, flags", [
    ("none", {}),
    ("kd", {"--amp": True, "--amp-dtype": "float16"}),
    ("dist", {"--opt": "adamw", "--lr": 1e-3, "--sched": "cosine", "--warmup-epochs": 0.5}),
    ("mse", {"--grad-accum-steps": 2, "--sched": "step", "--decay-epochs": 1}),
    ("diffkd", {"--amp": True, "--channels-last": True, "--nesterov": True, "--no-decay-norm-bias": True}),
])
def test_every_method_trains_and_writes_its_outputs(method, flags, data_dir, teacher_ckpt, tmp_path, capsys):
    argv = (common(data_dir, tmp_path, **{"--method": "none", **flags}) if method == "none"
            else distill(data_dir, tmp_path, teacher_ckpt, method, **flags))
    code, out, err = run_cli(train, [*argv, "--epochs", 2, "--experiment", "run"], capsys)
    assert code == 0, err
    folder = tmp_path / "run"
    for name in ("args.yaml", "summary.csv", "env.txt", "log.txt", "last.pth", "best.pth", "plots/losses.png",
                 "plots/accuracy.png"):
        assert (folder / name).is_file(), name
    assert (folder / "plots/gamma.png").is_file() == (method == "diffkd")
    rows = read_summary(folder)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0]["steps"] == "6"  # 48 images in batches of 8 (with --grad-accum-steps 2: 2 × 4)
    assert ("batch 8 = 1 process(es) × 4 × 2 accumulation" in out) == (method == "mse")
    if method == "diffkd":
        assert {"train_feature/kd_loss", "train_feature/diffusion_loss", "train_feature/gamma",
                "train_logit/kd_loss"} <= set(rows[0])
    elif method != "none":
        assert "teacher resnet14: top-1" in out
    saved = yaml.safe_load((folder / "args.yaml").read_text())
    assert saved["method"] == method and saved["ce_weight"] == {"kd": 0.1}.get(method, 1.0)
    last_line = out.strip().splitlines()[-1]
    assert "last-epoch top-1" in last_line and "best top-1" in last_line
    assert (folder / "log.txt").read_text().strip().splitlines()[-1] == last_line
    assert ("extra training-time parameters" in out) == (method != "none")
    assert ("student resnet8:" in out) == (method != "none")  # a model trained alone is not a "student"
    assert ("logit head" in out) == (method == "diffkd")  # KD and DIST have no head of their own
    assert "device: cpu" in (folder / "env.txt").read_text()


def test_config_overlays_defaults_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("student: resnet8\nmethod: kd\nlr: 0.2\ndecay_milestones: [3, 4]\nnesterov: true\n")
    args, explicit = parse_args(["-c", str(config), "--lr", "0.3"])
    assert (args.student, args.method, args.lr, args.decay_milestones, args.nesterov) == ("resnet8", "kd", 0.3,
                                                                                          [3, 4], True)
    assert args.epochs == 15 and args.sched == "cosine"  # untouched: Fashion-MNIST's recipe, not CIFAR-100's
    assert {"student", "method", "lr", "decay_milestones", "nesterov"} <= explicit and "epochs" not in explicit


@pytest.mark.parametrize("dataset, epochs, lr, sched", [("fashion-mnist", 15, 0.1, "cosine"),
                                                       ("cifar100", 240, 0.05, "multistep"),
                                                       ("imagenet", 100, 0.1, "step")])
def test_the_default_recipe_follows_the_dataset(dataset, epochs, lr, sched):
    args, _ = parse_args(["--student", "resnet8", "--dataset", dataset])
    assert (args.epochs, args.lr, args.sched) == (epochs, lr, sched)
    assert parse_args(["--student", "resnet8", "--dataset", dataset, "--epochs", "3"])[0].epochs == 3


def test_every_flag_has_help():
    missing = [action.option_strings for action in build_parser()._actions if not action.help]
    assert missing == []


@pytest.mark.parametrize("argv, config", [([], "demo.yaml"),
                                          (["--demo", "--task", "detection"], "detection/demo.yaml"),
                                          (["--demo", "--task", "segmentation"], "segmentation/demo.yaml")])
def test_the_demos_are_spelled_out_in_their_configs(argv, config):
    default, _ = parse_args(argv)  # no arguments at all: the classification demo
    from_config, _ = parse_args(["-c", str(REPO / "configs" / config)])
    assert default.demo and vars(default) == {**vars(from_config), "config": None}


def test_lr_schedules_warm_up_and_decay_at_epoch_boundaries():
    args, _ = parse_args(["--student", "resnet8", "--lr", "0.1", "--epochs", "10", "--warmup-epochs", "1",
                          "--sched", "multistep", "--decay-milestones", "5", "8"])
    factor = lr_factor_schedule(args, steps_per_epoch=4)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4 * 5 - 1) == 1.0 and factor(4 * 5) == pytest.approx(0.1) and factor(4 * 8) == pytest.approx(0.01)
    args.sched, args.min_lr = "cosine", 0.001
    factor = lr_factor_schedule(args, steps_per_epoch=4)
    assert factor(4) == pytest.approx(1.0) and factor(40) == pytest.approx(0.01)
    args.sched, args.decay_epochs = "step", 3
    factor = lr_factor_schedule(args, steps_per_epoch=4)
    assert factor(4 * 3 - 1) == 1.0 and factor(4 * 3) == pytest.approx(0.1) and factor(4 * 9) == pytest.approx(1e-3)


# ---- resume (the interrupt points are in test_train_resume.py) ---------------------------------------------------
def test_resume_refuses_changed_settings(data_dir, teacher_ckpt, tmp_path, capsys):
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--max-steps": 1, "--experiment": "run"})
    assert run_cli(train, argv, capsys)[0] == 0
    code, _, err = run_cli(train, ["--resume", tmp_path / "run", "--lr", "0.5"], capsys)
    assert_clean_failure(code, err, "lr (saved 0.05, given 0.5)")


# ---- DDP --------------------------------------------------------------------------------------------------------
def test_two_process_torchrun_on_cpu_trains_and_reduces_metrics(data_dir, teacher_ckpt, tmp_path, capsys):
    code, out, _ = run_cli(diffkd_eval, [teacher_ckpt, "--model", "resnet14", "--data-dir", data_dir], capsys)
    one_process_top1 = out.split("test top-1 ")[1].split("%")[0]
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--epochs": 1, "--experiment": "ddp"})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "diffkd.train", *argv], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "batch 8 = 2 process(es) × 4" in result.stdout
    assert result.stdout.count("final: last-epoch top-1") == 1  # only rank 0 speaks
    # each process tests half of the 24 images; the sums over both give the one-process accuracy
    assert f"teacher resnet14: top-1 {one_process_top1}%" in result.stdout
    rows = read_summary(tmp_path / "ddp")
    assert rows[0]["steps"] == "6"  # 48 images in global batches of 8, each process reading its half
    checkpoint = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)
    assert len(checkpoint["rng"]) == 2  # both processes' random streams, for an exact resume
    assert not any(key.startswith("module.") for key in checkpoint["student"])


# ---- teacher checkpoints, eval and export ------------------------------------------------------------------------
def test_teacher_checkpoint_for_another_architecture_is_refused(data_dir, teacher_ckpt, tmp_path, capsys):
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--teacher": "resnet20", "--experiment": "run"})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, str(teacher_ckpt), "resnet20")
    assert not (tmp_path / "run").exists()


def test_a_teacher_without_weights_is_refused(data_dir, tmp_path, capsys):
    argv = common(data_dir, tmp_path, **{"--method": "kd", "--teacher": "resnet14"})
    assert_clean_failure(*run_cli(train, argv, capsys)[::2], "--teacher-ckpt", "--method none --student resnet14")


def test_eval_and_export_in_the_benchmark_format(data_dir, teacher_ckpt, tmp_path, capsys):
    assert run_cli(train, distill(data_dir, tmp_path, teacher_ckpt, **{"--experiment": "run"}), capsys)[0] == 0
    checkpoint = tmp_path / "run" / "best.pth"
    code, out, err = run_cli(diffkd_eval, [checkpoint, "--data-dir", data_dir], capsys)
    assert code == 0, err
    summary = read_summary(tmp_path / "run")
    assert f"test top-1 {float(summary[-1]['val_top1']):.2f}%" in out and "on 24 images" in out

    exported = tmp_path / "resnet8.pth"
    code, out, err = run_cli(diffkd_eval, [checkpoint, "--export", exported, "--no-eval"], capsys)
    assert code == 0, err
    content = torch.load(exported, weights_only=True)
    assert set(content) == {"model", "epoch", "accuracy", "arch", "dataset", "task"}
    assert (content["arch"], content["dataset"], content["epoch"]) == ("resnet8", "fashion-mnist", 1)
    assert content["accuracy"] == pytest.approx(float(summary[-1]["val_top1"]), abs=1e-4)
    load_checkpoint(create_model("resnet8", num_classes=10, in_chans=1), exported, strict=True)
    code, out, err = run_cli(diffkd_eval, [exported, "--data-dir", data_dir], capsys)  # its model from "arch"
    assert code == 0 and f"test top-1 {float(summary[-1]['val_top1']):.2f}%" in out
    # the exported student teaches the next run
    argv = common(data_dir, tmp_path, **{"--method": "kd", "--teacher": "resnet8", "--teacher-ckpt": exported,
                                         "--experiment": "next", "--max-steps": 1})
    assert run_cli(train, argv, capsys)[0] == 0

    before = exported.read_bytes()
    code, _, err = run_cli(diffkd_eval, [checkpoint, "--export", exported], capsys)
    assert_clean_failure(code, err, "already exists")
    assert exported.read_bytes() == before


# ---- bad input --------------------------------------------------------------------------------------------------
def test_missing_data_dir_names_the_path_the_debian_package_and_the_flag(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(train, common(missing, tmp_path / "out", **{"--method": "none"}), capsys)
    assert_clean_failure(code, err, str(missing), "dataset-fashion-mnist", "--data-dir")
    assert not (tmp_path / "out").exists()


def test_a_data_dir_without_the_files_is_refused(tmp_path, capsys):
    code, _, err = run_cli(train, common(tmp_path, tmp_path / "out", **{"--method": "none"}), capsys)
    assert_clean_failure(code, err, "train-images-idx3-ubyte", "--data-dir")


@pytest.mark.parametrize("flags, needles", [
    ({"--student": "resnet9"}, ("unknown model name 'resnet9'",)),
    ({"--student": None}, ("--student is required",)),
    ({"--batch-size": 9, "--grad-accum-steps": 2}, ("must be divisible",)),
])
def test_bad_settings_are_refused_before_anything_is_written(flags, needles, data_dir, tmp_path, capsys):
    code, _, err = run_cli(train, common(data_dir, tmp_path / "out", **{"--method": "none", **flags}), capsys)
    assert_clean_failure(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_unknown_method_and_unknown_config_key_are_refused(data_dir, tmp_path, capsys):
    code, _, err = run_cli(train, common(data_dir, tmp_path, **{"--method": "crd"}), capsys)
    assert code == 2 and "invalid choice: 'crd'" in err and "Traceback" not in err
    config = tmp_path / "bad.yaml"
    config.write_text("student: resnet8\nlearning_rate: 0.1\n")
    code, _, err = run_cli(train, ["-c", config], capsys)
    assert_clean_failure(code, err, "unknown key 'learning_rate'", "Did you mean 'lr'?", str(config))
    config.write_text("student: resnet8\nepochs: many\n")
    assert_clean_failure(*run_cli(train, ["-c", config], capsys)[::2], "--epochs", str(config))


def test_output_path_that_is_a_file_is_refused(data_dir, tmp_path, capsys):
    output = tmp_path / "output"
    output.write_text("not a folder")
    code, _, err = run_cli(train, common(data_dir, output, **{"--method": "none"}), capsys)
    assert_clean_failure(code, err, f"output path {output} is a file")
    assert output.read_text() == "not a folder"


def test_an_existing_run_is_not_overwritten_without_resume(data_dir, tmp_path, capsys):
    argv = common(data_dir, tmp_path, **{"--method": "none", "--experiment": "run", "--max-steps": 1})
    assert run_cli(train, argv, capsys)[0] == 0
    before = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()}
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "already holds a run", "--resume")
    assert before == {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()}


def test_corrupted_or_truncated_checkpoints_are_refused(data_dir, teacher_ckpt, tmp_path, capsys):
    argv = common(data_dir, tmp_path, **{"--method": "none", "--experiment": "run", "--max-steps": 1})
    assert run_cli(train, argv, capsys)[0] == 0
    last = tmp_path / "run" / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    code, _, err = run_cli(train, ["--resume", tmp_path / "run"], capsys)
    assert_clean_failure(code, err, str(last), "truncated or corrupted")
    code, _, err = run_cli(diffkd_eval, [last], capsys)
    assert_clean_failure(code, err, "truncated or corrupted")
    broken_teacher = tmp_path / "teacher.pth"
    broken_teacher.write_bytes(teacher_ckpt.read_bytes()[: teacher_ckpt.stat().st_size // 2])
    code, _, err = run_cli(train, distill(data_dir, tmp_path, broken_teacher, **{"--experiment": "t"}), capsys)
    assert_clean_failure(code, err, str(broken_teacher), "truncated or corrupted")
    code, _, err = run_cli(train, ["--resume", teacher_ckpt], capsys)
    assert_clean_failure(code, err, "is not a diffkd training checkpoint")


def test_a_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(data_dir, teacher_ckpt, tmp_path, capsys,
                                                                    monkeypatch):
    original_forward = Distiller.forward

    def poisoned_in_epoch_two(self, images, targets):
        out = original_forward(self, images, targets)
        if poisoned_in_epoch_two.calls >= 6:  # epoch 1 has 6 steps
            out["loss"] = out["loss"] * float("nan")
        poisoned_in_epoch_two.calls += 1
        return out

    poisoned_in_epoch_two.calls = 0
    monkeypatch.setattr(Distiller, "forward", poisoned_in_epoch_two)
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--epochs": 3, "--experiment": "run"})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "not finite at epoch 2, step 1", f"{tmp_path / 'run' / 'last.pth'}, is untouched",
                         "lower --lr", expected_code=3)
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1
    assert len(read_summary(tmp_path / "run")) == 1


def test_a_diverging_run_stops_before_writing_a_checkpoint(data_dir, tmp_path, capsys):
    argv = common(data_dir, tmp_path, **{"--method": "none", "--lr": 1e30, "--experiment": "run"})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "the loss is not finite", "no checkpoint had been written yet", expected_code=3)
    assert not (tmp_path / "run" / "last.pth").exists()


# ---- the demo ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist package")
def test_the_demo_runs_end_to_end_on_real_data_with_a_step_cap(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    argv = ["--demo", "--max-steps", 2, "--val-subset", 100, "--output", tmp_path, "--experiment", "demo"]
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    cached = list((tmp_path / "cache" / "teachers").glob("fashion-mnist-resnet14-*.pth"))
    assert len(cached) == 1 and set(torch.load(cached[0], weights_only=True)) >= {"model", "accuracy"}
    table = (tmp_path / "demo" / "results.txt").read_text()
    assert table.strip() == "\n".join(out.strip().splitlines()[-len(table.strip().splitlines()):])
    for label in ("teacher resnet14", "student resnet8", "alone", "with DiffKD", "difference", "wall time"):
        assert label in table
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "comparison.png", "demo.yaml", "diffkd-seed0", "diffkd-seed1", "none-seed0", "none-seed1", "results.txt",
        "teacher", "wall_times.txt"]
    assert "runs stopped by --max-steps: smoke numbers" in table
    # a second demo reuses the cached teacher
    code, out, err = run_cli(train, [*argv[:-1], "demo2"], capsys)
    assert code == 0 and f"reusing {cached[0]}" in out and not (tmp_path / "demo2" / "teacher").exists()


# ---- CUDA graphs ------------------------------------------------------------------------------------------------
def test_cuda_graph_on_a_cpu_is_refused_and_auto_says_the_heads_run_eagerly(data_dir, teacher_ckpt, tmp_path,
                                                                             capsys):
    argv = distill(data_dir, tmp_path, teacher_ckpt, **{"--experiment": "run", "--max-steps": 1})
    code, _, err = run_cli(train, [*argv, "--cuda-graph", "on"], capsys)
    assert_clean_failure(code, err, "--cuda-graph on needs a CUDA device")
    assert not (tmp_path / "run").exists()
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    assert "feature head runs eager torch" in out and "logit head runs eager torch" in out


def test_graphed_heads_keep_the_distillers_state_dict_and_results(data_dir, teacher_ckpt):
    from diffkd.graphs import CUDAGraphHead
    from diffkd.train.build import build_model, graph_heads
    from diffkd.train.runtime import Runtime
    args, _ = parse_args(["--student", "resnet8", "--teacher", "resnet14", "--teacher-ckpt", str(teacher_ckpt)])
    info = {"num_classes": 10, "in_chans": 1, "image_size": 28}
    runtime = Runtime(device=torch.device("cpu"))
    bare, wrapped = build_model(args, info, runtime), build_model(args, info, runtime)
    lines = []
    graph_heads(wrapped, "on", torch.device("cuda"), lines.append)  # as a CUDA run wraps; CPU tensors pass through
    assert all(isinstance(head, CUDAGraphHead) for head in wrapped.heads.values())
    assert lines == ["feature head runs graphed Triton (captured on its first step, checked against an eager step)",
                     "logit head runs graphed Triton (captured on its first step, checked against an eager step)"]
    assert list(bare.state_dict()) == list(wrapped.state_dict())
    images, targets = torch.randn(4, 1, 28, 28), torch.arange(4)
    torch.manual_seed(0)
    expected = bare(images, targets)
    torch.manual_seed(0)
    actual = wrapped(images, targets)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.parametrize("native", [True, False])
def test_amp_on_a_cpu_uses_bfloat16_only_where_the_cpu_has_it(native, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffkd.train.resume.cpu_supports_native_bf16", lambda: native)
    argv = common(data_dir, tmp_path, **{"--method": "none", "--amp": True, "--max-steps": 1, "--experiment": "run"})
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())["amp"] == native
    assert ("no native bfloat16" in out) == (not native)
    assert ("AMP bfloat16" in out) == native
