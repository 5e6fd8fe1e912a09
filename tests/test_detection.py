"""Detection: torchvision detectors, FPN levels matched by stride, and the DetectionDistiller's heads on every level."""
import pytest
import torch

from diffkd.distill import DetectionDistiller, HeadBinding, build_detection_distiller
from diffkd.methods import FeatureRegression, method_settings
from diffkd.models import (FPNLevel, build_detector, evaluate_detection, fpn_levels, match_fpn_levels, probe_taps,
                           save_checkpoint_benchmark_format)
from diffkd.modules import DiffKDHead

IMAGE = 64
CLASSES = 11  # ten item classes and the background
FASTER_RCNN_LEVELS = [("0", 4, (16, 16)), ("1", 8, (8, 8)), ("2", 16, (4, 4)), ("3", 32, (2, 2)),
                      ("pool", 64, (1, 1))]
RETINANET_LEVELS = [("0", 8, (8, 8)), ("1", 16, (4, 4)), ("2", 32, (2, 2)), ("p6", 64, (1, 1)), ("p7", 128, (1, 1))]
FASTER_RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def _detector(architecture="fasterrcnn", backbone="resnet18", fpn_channels=32, **options):
    return build_detector(architecture, backbone, num_classes=CLASSES, image_size=IMAGE, fpn_channels=fpn_channels,
                          **options)


def _scenes(batch=2):
    """Random images in 0..1 with one or two boxes each, as torchvision's detectors take them."""
    images, targets = [], []
    for index in range(batch):
        count = 1 + index % 2
        corner = torch.randint(0, IMAGE // 2, (count, 2)).float()
        extent = torch.randint(8, IMAGE // 2, (count, 2)).float()
        images.append(torch.rand(3, IMAGE, IMAGE))
        targets.append({"boxes": torch.cat([corner, corner + extent], dim=1),
                        "labels": torch.randint(1, CLASSES, (count,)), "image_id": torch.tensor(100 + index)})
    return images, targets


def _distiller(method, architecture="fasterrcnn", log=None, teacher_backbone="resnet18", fpn_channels=32, **options):
    teacher = _detector(architecture, teacher_backbone, fpn_channels)
    student = _detector(architecture, "resnet18", fpn_channels)
    settings = method_settings(method, "fashion-scenes", task="detection")
    return build_detection_distiller(settings, student, teacher, image_size=IMAGE, log=log or (lambda line: None),
                                     **options)


def _train_steps(distiller, steps=2):
    """A few SGD steps; returns the last step's output, with the gradients of its backward left in place."""
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3)
    for _ in range(steps):
        out = distiller(*_scenes())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    return out


@pytest.mark.parametrize("architecture, expected", [("fasterrcnn", FASTER_RCNN_LEVELS),
                                                    ("retinanet", RETINANET_LEVELS)])
def test_fpn_levels_and_their_strides_come_from_dry_forward_passes(architecture, expected):
    detector = _detector(architecture)
    levels = fpn_levels(detector, IMAGE)
    assert [(level.key, level.stride, level.size) for level in levels] == expected
    assert all(level.channels == 32 and level.tap == f"backbone[{level.key}]" for level in levels)
    # The taps read exactly those maps from a forward of the whole detector.
    shapes = probe_taps(detector, [level.tap for level in levels], (3, IMAGE, IMAGE))
    assert [shapes[level.tap][2:] for level in levels] == [level.size for level in levels]


def test_levels_pair_by_stride_whatever_their_keys_and_order():
    def level(key, stride):
        return FPNLevel(key, f"backbone[{key}]", 8, stride, (64 // stride, 64 // stride))

    student = [level("0", 8), level("1", 16), level("2", 32)]
    teacher = [level("p5", 32), level("p3", 8), level("p4", 16)]
    assert [(s.key, t.key) for s, t in match_fpn_levels(student, teacher)] == [("0", "p3"), ("1", "p4"), ("2", "p5")]
    with pytest.raises(ValueError, match="several levels of the same stride"):
        match_fpn_levels(student + [level("3", 32)], teacher)


def test_entry_taps_name_the_entries_a_module_returns():
    detector = _detector()
    with pytest.raises(ValueError, match=r"no entry 'p9'; its entries are: '0', '1', '2', '3', 'pool'"):
        probe_taps(detector, "backbone[p9]", (3, IMAGE, IMAGE))
    with pytest.raises(ValueError, match="not a dict, tuple or list"):
        probe_taps(detector, "backbone.body.layer1[0]", (3, IMAGE, IMAGE))
    with pytest.raises(ValueError, match="produced a OrderedDict, not a tensor"):
        probe_taps(detector, "backbone", (3, IMAGE, IMAGE))


@pytest.mark.parametrize("method", ["none", "mse", "diffkd"])
def test_each_method_trains_a_few_steps_with_gradients_in_every_head_and_none_in_the_teacher(method):
    distiller = _distiller(method).train()
    teacher_before = {} if distiller.teacher is None else {
        key: value.clone() for key, value in distiller.teacher.state_dict().items()}
    out = _train_steps(distiller)
    heads = [] if method == "none" else [f"fpn.{key}" for key, _, _ in FASTER_RCNN_LEVELS]
    assert list(distiller.bindings) == heads
    terms = {"none": (), "mse": ("kd_loss",), "diffkd": ("kd_loss", "diffusion_loss", "ae_loss", "gamma")}[method]
    expected = {"loss", "detection_loss"} | {f"detection/{name}" for name in FASTER_RCNN_LOSSES} | {
        f"{head}/{term}" for head in heads for term in terms}
    assert expected <= set(out)
    assert all(torch.isfinite(value) and value.dim() == 0 for value in out.values())
    assert all(not value.requires_grad for key, value in out.items() if key != "loss")
    assert all(p.grad is not None for p in distiller.heads.parameters())
    if method == "none":
        assert distiller.teacher is None and out["loss"].item() == out["detection_loss"].item()
        return
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert all(torch.equal(value, teacher_before[key]) for key, value in distiller.teacher.state_dict().items())


def test_the_loss_is_the_detectors_losses_plus_each_levels_weighted_head():
    weights = {"fpn.0": 0.0, "fpn.2": 3.0}
    distiller = _distiller("mse", head_weights=weights).train()
    out = distiller(*_scenes())
    torch.testing.assert_close(out["detection_loss"], sum(out[f"detection/{name}"] for name in FASTER_RCNN_LOSSES))
    heads = sum(weights.get(f"fpn.{key}", 1.0) * out[f"fpn.{key}/kd_loss"] for key, _, _ in FASTER_RCNN_LEVELS)
    torch.testing.assert_close(out["loss"].detach(), out["detection_loss"] + heads)


def test_the_teacher_runs_its_transform_and_backbone_only():
    distiller = _distiller("mse").train()

    def refuse(*args):
        raise AssertionError("the teacher's detection heads ran")

    distiller.teacher.rpn.register_forward_pre_hook(refuse)
    distiller.teacher.roi_heads.register_forward_pre_hook(refuse)
    assert torch.isfinite(distiller(*_scenes())["loss"])


@pytest.mark.parametrize("architecture, losses", [("retinanet", ("classification", "bbox_regression")),
                                                  ("fcos", ("classification", "bbox_regression", "bbox_ctrness"))])
def test_retinanet_and_fcos_get_a_diffkd_head_on_each_of_their_levels(architecture, losses):
    lines = []
    distiller = _distiller("diffkd", architecture, log=lines.append).train()
    names = [f"fpn.{key}" for key, _, _ in RETINANET_LEVELS]
    assert list(distiller.bindings) == names
    assert [binding.teacher for binding in distiller.bindings.values()] == [
        f"backbone[{key}]" for key, _, _ in RETINANET_LEVELS]
    assert lines[0] == "detection diffkd heads: 5 FPN levels matched by stride, one head per level"
    assert lines[-1] == ("  fpn.p7: student backbone[p7] 32×1×1 (stride 128) -> "
                         "teacher backbone[p7] 32×1×1 (stride 128)")
    out = _train_steps(distiller, steps=1)
    assert {f"detection/{name}" for name in losses} <= set(out) and torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in distiller.heads.parameters())


def test_resnet50_teacher_and_resnet18_student_with_the_papers_detection_heads():
    lines = []
    distiller = _distiller("diffkd", "retinanet", teacher_backbone="resnet50", fpn_channels=256,
                           log=lines.append).train()
    assert "  fpn.0: student backbone[0] 256×8×8 (stride 8) -> teacher backbone[0] 256×8×8 (stride 8)" in lines
    for name in distiller.bindings:
        head = distiller.heads.get_submodule(name)
        assert isinstance(head, DiffKDHead) and head.kernel_size == 3 and not head.use_ae
        assert (head.kd_weight, head.diffusion_weight, head.feature_norm) == (1.0, 1.0, "channel")
    # a 256-channel spatial head without autoencoder has the parameters of the CIFAR ResNet32x4 feature head
    assert distiller.extra_parameter_count() == 5 * 694_722
    out = distiller(*_scenes())
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in distiller.heads.parameters())


def test_a_shared_head_is_one_module_for_every_level():
    lines = []
    distiller = _distiller("diffkd", share_head=True, log=lines.append).train()
    assert list(distiller.heads) == ["fpn"] and isinstance(distiller.heads["fpn"], DiffKDHead)
    assert {binding.head for binding in distiller.bindings.values()} == {"fpn"}
    assert distiller.extra_parameter_count() == sum(p.numel() for p in distiller.heads["fpn"].parameters())
    assert lines[0].endswith("one head shared by all levels")
    out = _train_steps(distiller, steps=1)
    assert {f"fpn.{key}/kd_loss" for key, _, _ in FASTER_RCNN_LEVELS} <= set(out)
    assert all(p.grad is not None for p in distiller.heads.parameters())


@pytest.mark.parametrize("student, teacher, message", [
    (dict(architecture="fasterrcnn"), dict(architecture="retinanet"),
     r"strides \[4, 8, 16, 32, 64\] and the teacher's \[8, 16, 32, 64, 128\]"),
    (dict(fpn_channels=32), dict(fpn_channels=64), "stride 4: the student has 32 channels and the teacher 64"),
    (dict(), dict(image_mean=(0.5, 0.5, 0.5)), "preprocess images differently .*image_mean"),
])
def test_detectors_whose_pyramids_or_preprocessing_differ_are_refused(student, teacher, message):
    settings = method_settings("diffkd", "fashion-scenes", task="detection")
    with pytest.raises(ValueError, match=message):
        build_detection_distiller(settings, _detector(**student), _detector(**teacher), image_size=IMAGE,
                                  log=lambda line: None)


def test_detection_settings_and_refusals():
    diffkd = method_settings("diffkd", "fashion-scenes", task="detection")
    assert (diffkd.kd_weight, diffkd.diffusion_weight, diffkd.ae_channels, diffkd.ce_weight) == (1.0, 1.0, 0, 1.0)
    mse = method_settings("mse", "fashion-scenes", task="detection")
    assert (diffkd.feature_norm, mse.feature_norm, mse.kd_weight) == ("channel", "channel", 1.0)
    paper = method_settings("diffkd", "coco", task="detection", feature_norm="none", kd_weight=5.0)
    assert (paper.feature_norm, paper.kd_weight) == ("none", 5.0)  # the paper's literal setting stays reachable
    assert method_settings("mse", "fashion-mnist").feature_norm == "none"
    with pytest.raises(ValueError, match="unknown feature norm 'layer'"):
        method_settings("mse", "coco", task="detection", feature_norm="layer")
    with pytest.raises(ValueError, match="method 'kd' does not apply to detection"):
        method_settings("kd", "fashion-scenes", task="detection")
    with pytest.raises(ValueError, match="dataset 'cifar100' has no detection targets"):
        method_settings("diffkd", "cifar100", task="detection")
    with pytest.raises(ValueError, match="multiple of 32"):
        _detector("fcos", fpn_channels=16)
    distiller = _distiller("mse")
    with pytest.raises(ValueError, match="call .train"):
        distiller.eval()(*_scenes())
    with pytest.raises(ValueError, match="method 'dist' does not apply to detection"):
        build_detection_distiller(method_settings("dist", "fashion-mnist"), distiller.student, distiller.teacher,
                                  image_size=IMAGE)
    with pytest.raises(ValueError, match="head_weights names unknown heads"):
        build_detection_distiller(method_settings("mse", "fashion-scenes", task="detection"), distiller.student,
                                  distiller.teacher, image_size=IMAGE, head_weights={"fpn.5": 1.0},
                                  log=lambda line: None)


def test_detectors_load_strictly_from_a_checkpoint(tmp_path):
    trained = _detector("retinanet")
    path = save_checkpoint_benchmark_format(trained, tmp_path / "retinanet.pth")
    loaded = _detector("retinanet", checkpoint=path)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in trained.state_dict().items())
    with pytest.raises(ValueError, match="does not fit the model retinanet_resnet50_fpn"):
        _detector("retinanet", "resnet50", checkpoint=path)


def test_evaluate_detection_returns_every_images_detections_and_restores_the_mode():
    student = _detector().train()
    batches = [_scenes(), _scenes(batch=1)]
    result = evaluate_detection(student, batches, "cpu")
    assert student.training
    assert result["image_ids"] == [100, 101, 100]
    assert len(result["predictions"]) == 3
    for prediction in result["predictions"]:
        assert set(prediction) == {"boxes", "scores", "labels"}
        assert prediction["boxes"].shape[1:] == (4,) and prediction["boxes"].dtype == torch.float32
    student.eval()
    with torch.no_grad():
        expected = student(batches[1][0])[0]
    torch.testing.assert_close(result["predictions"][2], expected)
    with pytest.raises(ValueError, match="image_id"):
        evaluate_detection(student, [([torch.rand(3, IMAGE, IMAGE)], [{"boxes": torch.zeros(0, 4)}])], "cpu")


def test_a_detection_distiller_distils_taps_not_outputs():
    teacher, student = _detector(), _detector()
    with pytest.raises(ValueError, match="bound to the models' outputs"):
        DetectionDistiller(teacher, student, {"x": FeatureRegression(32, 32)}, bindings={"x": HeadBinding(None, None)})


def test_channel_feature_norm_makes_the_kd_term_blind_to_the_teachers_scale_but_not_the_diffusion_loss():
    # PKD-style: the denoised feature and the target are standardised per channel before the distance, so a
    # teacher map ×10 + 3 gives the same KD loss, while the diffusion model still learns the raw teacher map.
    student, teacher = torch.randn(4, 16, 6, 6), torch.randn(4, 16, 6, 6)
    results = {}
    for norm in ("none", "channel"):
        torch.manual_seed(0)
        head = DiffKDHead(16, 16, feature_norm=norm)
        for scale in (1, 10):
            results[norm, scale] = head(student, teacher * scale + (scale - 1) / 3,
                                        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(results["channel", 1]["kd_loss"], results["channel", 10]["kd_loss"])
    assert results["none", 10]["kd_loss"] > 10 * results["none", 1]["kd_loss"]
    assert results["channel", 10]["diffusion_loss"] != results["channel", 1]["diffusion_loss"]
    torch.testing.assert_close(results["none", 1]["diffusion_loss"], results["channel", 1]["diffusion_loss"])
    with pytest.raises(ValueError, match="unknown feature_norm 'batch'"):
        DiffKDHead(16, 16, feature_norm="batch")


def test_channel_feature_norm_of_the_mse_baseline_is_pkds_standardised_distance():
    torch.manual_seed(0)
    head = FeatureRegression(8, 16, feature_norm="channel").train()
    student, teacher = torch.randn(4, 8, 5, 5), torch.randn(4, 16, 5, 5)
    projected = head.proj(student)

    def standardised(x):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        return (flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True)

    expected = (standardised(projected) - standardised(teacher)).pow(2).mean()
    assert head(student, teacher * 50 - 2)["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_predictions_are_drawn_at_each_images_top_k_foreground_detections(tmp_path):
    from diffkd.plots_dense import draw_detections, top_detections
    prediction = {"boxes": torch.arange(16.0).view(4, 4), "scores": torch.tensor([0.2, 0.9, 0.95, 0.4]),
                  "labels": torch.tensor([1, 2, 0, 3])}
    best = top_detections(prediction, 2)
    assert best["labels"].tolist() == [2, 3] and best["scores"].tolist() == pytest.approx([0.9, 0.4])
    assert torch.equal(best["boxes"], prediction["boxes"][[1, 3]])
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert len(top_detections(empty, 5)["scores"]) == 0
    images = [torch.rand(3, 24, 32), torch.rand(3, 32, 20)]  # sizes differ: each panel shows its own image
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0]]), "labels": torch.tensor([1])}] * 2
    path = draw_detections(images, targets, {"student": [prediction, empty]}, tmp_path / "d.png",
                           ("background", "a", "b", "c"), top_k=2)
    assert path.is_file()
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        draw_detections(images, targets, {"student": [prediction, empty]}, tmp_path / "d.png", ("bg", "a"), top_k=0)
