"""``python -m diffkd.train --task detection|segmentation`` end to end on tiny Fashion-scenes (64-pixel canvases of
the tiny generated Fashion-MNIST of train_cli.py), with narrow models: every method trains, resumes exactly,
reports mAP / mIoU, and bad input is one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffkd import eval as diffkd_eval
from diffkd import train
from train_cli import assert_clean_failure, data_dir, read_summary, run_cli  # noqa: F401

DETECTOR, SEGMENTER = "fasterrcnn_resnet18_fpn", "lraspp_mobilenet_v3_large"


def scenes(data_dir, output, task, student, **flags) -> list:
    settings = {"--task": task, "--dataset": "fashion-scenes", "--data-dir": data_dir, "--output": output,
                "--student": student, "--image-size": 64, "--train-subset": 8, "--val-subset": 4, "--epochs": 1,
                "-b": 4, "--log-interval": 1, **flags}
    return [str(token) for key, value in settings.items() if value is not None
            for token in ((key,) if value is True else (key, value))]


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory) -> dict:
    """A detection and a segmentation teacher, each trained for two steps and exported."""
    folder = tmp_path_factory.mktemp("dense-teachers")
    files = {}
    for task, model, extra in (("detection", DETECTOR, {"--fpn-channels": 32}), ("segmentation", SEGMENTER, {})):
        argv = scenes(data_dir, folder, task, model, **{"--method": "none", "--experiment": task, **extra})
        assert train.main(argv) == 0
        files[task] = folder / f"{task}.pth"
        assert diffkd_eval.main([str(folder / task / "last.pth"), "--export", str(files[task]), "--no-eval"]) == 0
    return files


@pytest.mark.parametrize("method", ["mse", "diffkd"])
def test_detection_methods_train_and_report_map(method, data_dir, teachers, tmp_path, capsys):
    argv = scenes(data_dir, tmp_path, "detection", DETECTOR, **{
        "--method": method, "--teacher": DETECTOR, "--teacher-ckpt": teachers["detection"], "--fpn-channels": 32,
        "--experiment": "run"})
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    row = read_summary(tmp_path / "run")[0]
    assert {"val_map", "val_map50", "train_detection_loss", "train_fpn.0/kd_loss", "train_fpn.pool/kd_loss"} <= set(row)
    assert all(float(row[key]) == float(row[key]) for key in row if key.startswith("train_"))  # finite, not NaN
    assert "5 FPN levels matched by stride" in out and "teacher fasterrcnn_resnet18_fpn: mAP" in out
    assert (tmp_path / "run" / "plots" / "predictions.png").is_file()
    code, out, err = run_cli(diffkd_eval, [tmp_path / "run" / "last.pth"], capsys)
    assert code == 0 and "test mAP" in out and "on 4 images" in out, err


@pytest.mark.parametrize("method", ["kd", "dist", "diffkd"])
def test_segmentation_methods_train_and_report_miou(method, data_dir, teachers, tmp_path, capsys):
    argv = scenes(data_dir, tmp_path, "segmentation", SEGMENTER, **{
        "--method": method, "--teacher": SEGMENTER, "--teacher-ckpt": teachers["segmentation"],
        "--experiment": "run"})
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    row = read_summary(tmp_path / "run")[0]
    assert {"val_miou", "val_pixel_accuracy", "train_ce_loss", "train_score_map/kd_loss"} <= set(row)
    assert (tmp_path / "run" / "plots" / "predictions.png").is_file()


def test_a_detection_run_resumes_bit_identically(data_dir, teachers, tmp_path, capsys):
    argv = scenes(data_dir, tmp_path, "detection", DETECTOR, **{
        "--method": "diffkd", "--teacher": DETECTOR, "--teacher-ckpt": teachers["detection"], "--fpn-channels": 32,
        "--epochs": 2, "--seed": 3})
    assert run_cli(train, [*argv, "--experiment", "straight"], capsys)[0] == 0
    assert run_cli(train, [*argv, "--experiment", "cut", "--max-steps", 3], capsys)[0] == 0
    code, out, err = run_cli(train, ["--resume", tmp_path / "cut"], capsys)
    assert code == 0 and "resumed at epoch 2, step 1" in out, err
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    for part in ("student", "heads"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert [row["val_map"] for row in read_summary(tmp_path / "straight")] == \
           [row["val_map"] for row in read_summary(tmp_path / "cut")]


@pytest.mark.parametrize("flags, needles", [
    ({"--task": "detection", "--dataset": "cifar100"}, ("--task detection does not fit --dataset cifar100",
                                                        "fashion-scenes, coco")),
    ({"--task": "classification", "--dataset": "fashion-scenes"}, ("add --task detection",)),
    ({"--student": "fasterrcnn_resnet9_fpn"}, ("unknown detector", "fasterrcnn_resnet50_fpn")),
    ({"--method": "kd"}, ("method 'kd' does not apply to detection",)),
])
def test_bad_dense_settings_are_one_line(flags, needles, data_dir, tmp_path, capsys):
    argv = scenes(data_dir, tmp_path / "out", "detection", DETECTOR, **{"--method": "none", **flags})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_teacher_and_student_levels_that_cannot_be_matched_are_refused(data_dir, teachers, tmp_path, capsys):
    # RetinaNet's pyramid has strides 8…128, Faster R-CNN's 4…64.
    retinanet = tmp_path / "retinanet"
    assert run_cli(train, scenes(data_dir, tmp_path, "detection", "retinanet_resnet18_fpn", **{
        "--method": "none", "--fpn-channels": 32, "--experiment": "retinanet", "--max-steps": 1}), capsys)[0] == 0
    argv = scenes(data_dir, tmp_path, "detection", DETECTOR, **{
        "--method": "diffkd", "--teacher": "retinanet_resnet18_fpn", "--teacher-ckpt": retinanet / "last.pth",
        "--fpn-channels": 32, "--experiment": "run"})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "stride")


def test_a_segmentation_teacher_with_other_classes_is_refused(data_dir, tmp_path, capsys):
    from diffkd.models.segmentation import build_segmenter
    from diffkd.models import save_checkpoint_benchmark_format
    teacher = save_checkpoint_benchmark_format(build_segmenter(SEGMENTER, num_classes=5), tmp_path / "t.pth")
    argv = scenes(data_dir, tmp_path, "segmentation", SEGMENTER, **{
        "--method": "diffkd", "--teacher": SEGMENTER, "--teacher-ckpt": teacher, "--experiment": "run"})
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, str(teacher))


def test_a_coco_file_with_a_box_outside_its_image_is_refused(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "coco" / split).mkdir(parents=True)
        Image.new("RGB", (32, 24)).save(tmp_path / "coco" / split / "a.png")
    (tmp_path / "coco" / "annotations").mkdir()
    for split, box in (("train", [2, 2, 10, 10]), ("val", [20, 2, 30, 10])):  # val: x 20..50 in a 32-wide image
        content = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
                   "categories": [{"id": 7, "name": "thing"}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": box, "area": 300,
                                    "iscrowd": 0}]}
        (tmp_path / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    argv = ["--task", "detection", "--dataset", "coco", "--data-dir", tmp_path / "coco", "--student", DETECTOR,
            "--method", "none", "--image-size", 32, "-b", 2, "--output", tmp_path / "out"]
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, "instances_val.json", "outside")


def test_a_detector_that_predicts_the_background_label_finishes_its_run(data_dir, tmp_path, capsys, monkeypatch):
    # RetinaNet scores class 0 like any class; early in training (here: by a large bias) it predicts label 0.
    from diffkd.train import dense

    def biased(*args, **kwargs):
        model = build_detector(*args, **kwargs)
        logits = model.head.classification_head.cls_logits
        with torch.no_grad():
            logits.bias.view(-1, model.head.classification_head.num_classes)[:, 0] = 6.0
        return model

    build_detector = dense.build_detector
    monkeypatch.setattr(dense, "build_detector", biased)
    argv = scenes(data_dir, tmp_path, "detection", "retinanet_resnet18_fpn", **{
        "--method": "none", "--fpn-channels": 32, "--experiment": "run", "--max-steps": 2})
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    assert "detection(s) labelled 0 (the background slot" in out
    assert read_summary(tmp_path / "run")[0]["val_map"] != ""


def test_a_mixed_size_segmentation_folder_of_3_classes_trains_with_diffkd_and_draws(tmp_path, capsys):
    from diffkd.models import save_checkpoint_benchmark_format
    from diffkd.models.segmentation import build_segmenter
    rng = np.random.default_rng(0)
    for split, sizes in (("train", [(40, 40)] * 4), ("val", [(36, 44), (32, 32), (44, 36)])):
        for folder in ("images", "masks"):
            (tmp_path / "seg" / folder / split).mkdir(parents=True)
        for index, (height, width) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                tmp_path / "seg" / "images" / split / f"{index}.png")
            Image.fromarray(rng.integers(0, 3, (height, width), dtype=np.uint8)).save(
                tmp_path / "seg" / "masks" / split / f"{index}.png")
    (tmp_path / "seg" / "classes.txt").write_text("ground\nsky\nsea\n")
    teacher = save_checkpoint_benchmark_format(build_segmenter(SEGMENTER, num_classes=3), tmp_path / "t.pth")
    argv = ["--task", "segmentation", "--dataset", "segfolder", "--data-dir", tmp_path / "seg", "--student",
            SEGMENTER, "--teacher", SEGMENTER, "--teacher-ckpt", teacher, "--method", "diffkd", "--image-size", 32,
            "-b", 2, "--epochs", 1, "--output", tmp_path, "--experiment", "run"]
    code, out, err = run_cli(train, argv, capsys)
    assert code == 0, err
    assert out.count("uses 1×1 convolutions") == 1
    assert read_summary(tmp_path / "run")[0]["val_miou"] != ""
    assert (tmp_path / "run" / "plots" / "predictions.png").is_file()


def test_a_truncated_image_fails_before_the_first_step_naming_its_file(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "coco" / split).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
            tmp_path / "coco" / split / "a.jpg")
        content = {"images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}],
                   "categories": [{"id": 7, "name": "thing"}], "annotations": []}
        (tmp_path / "coco" / "annotations").mkdir(exist_ok=True)
        (tmp_path / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    path = tmp_path / "coco" / "val" / "a.jpg"
    path.write_bytes(path.read_bytes()[:-40])
    argv = ["--task", "detection", "--dataset", "coco", "--data-dir", tmp_path / "coco", "--student", DETECTOR,
            "--method", "none", "--image-size", 32, "-b", 2, "--output", tmp_path / "out"]
    code, _, err = run_cli(train, argv, capsys)
    assert_clean_failure(code, err, str(path), "truncated")
