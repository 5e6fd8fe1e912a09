"""Segmentation: DIST and KL per pixel on class-score maps, torchvision segmenters and the SegmentationDistiller."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffkd.distill import build_segmentation_distiller
from diffkd.methods import method_settings
from diffkd.losses import dist_loss, kl_div_loss
from diffkd.metrics import SegmentationMetric
from diffkd.models import build_segmenter, evaluate_segmentation, save_checkpoint_benchmark_format
from diffkd.models.segmentation import IGNORE_INDEX
from diffkd.modules import DiffKDHead

IMAGE = 64
CLASSES = 11
INPUT = (3, IMAGE, IMAGE)
TEACHER, STUDENT = "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"  # 1/16 and 1/8 score maps


def _pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    return covariance / (math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) + 1e-8)


def _softmax(scores: list[float], temperature: float) -> list[float]:
    exps = [math.exp(score / temperature) for score in scores]
    return [value / sum(exps) for value in exps]


def _pixels(scores: torch.Tensor, temperature: float) -> list[list[float]]:
    """Each pixel's class probabilities, in Python floats (an independent computation)."""
    batch, _, height, width = scores.shape
    return [_softmax(scores[b, :, h, w].tolist(), temperature)
            for b in range(batch) for h in range(height) for w in range(width)]


def test_dist_on_score_maps_correlates_each_pixels_classes_and_each_class_over_all_pixels():
    """As the DIST paper's segmentation code: every pixel is an instance."""
    student, teacher = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    p_s, p_t = _pixels(student, 2.0), _pixels(teacher, 2.0)
    inter = 1 - sum(_pearson(s, t) for s, t in zip(p_s, p_t)) / len(p_s)
    intra = 1 - sum(_pearson([s[k] for s in p_s], [t[k] for t in p_t]) for k in range(5)) / 5
    expected = 2.0 ** 2 * (0.5 * inter + 3.0 * intra)
    assert dist_loss(student, teacher, beta=0.5, gamma=3.0, temperature=2.0).item() == pytest.approx(expected,
                                                                                                    rel=1e-10)


def test_kl_on_score_maps_is_the_mean_over_pixels_of_each_pixels_kl():
    student, teacher = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    p_s, p_t = _pixels(student, 3.0), _pixels(teacher, 3.0)
    expected = 9.0 * sum(sum(t * math.log(t / s) for s, t in zip(ps, pt)) for ps, pt in zip(p_s, p_t)) / len(p_s)
    assert kl_div_loss(student, teacher, temperature=3.0).item() == pytest.approx(expected, rel=1e-10)


def test_the_diffkd_heads_dist_distance_works_per_pixel_on_maps():
    head = DiffKDHead(11, 11, distance="dist", backend="torch").train()
    out = head(torch.randn(2, 11, 4, 4), torch.randn(2, 11, 4, 4))
    denoised, target = out["denoised"].double(), out["target"].double()
    p_s, p_t = _pixels(denoised, 1.0), _pixels(target, 1.0)
    inter = 1 - sum(_pearson(s, t) for s, t in zip(p_s, p_t)) / len(p_s)
    intra = 1 - sum(_pearson([s[k] for s in p_s], [t[k] for t in p_t]) for k in range(11)) / 11
    assert out["kd_loss"].item() == pytest.approx(inter + intra, rel=1e-4)


def _batch(batch=2):
    masks = torch.randint(0, CLASSES, (batch, IMAGE, IMAGE))
    masks[:, :5] = IGNORE_INDEX
    return torch.randn(batch, *INPUT), masks


def _distiller(method, teacher=TEACHER, student=STUDENT, log=None):
    settings = method_settings(method, "fashion-scenes", task="segmentation")
    return build_segmentation_distiller(settings, build_segmenter(student, num_classes=CLASSES),
                                        build_segmenter(teacher, num_classes=CLASSES), input_size=INPUT,
                                        log=log or (lambda line: None))


@pytest.mark.parametrize("method", ["none", "kd", "dist", "diffkd"])
def test_each_method_trains_a_few_steps_with_gradients_in_every_head_and_none_in_the_teacher(method):
    lines = []
    distiller = _distiller(method, log=lines.append).train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3)
    for _ in range(2):
        out = distiller(*_batch())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert all(torch.isfinite(value) and value.dim() == 0 for value in out.values())
    if method == "none":
        assert distiller.teacher is None and set(out) == {"loss", "ce_loss"} and lines == []
        return
    assert list(distiller.bindings) == ["score_map"]
    assert {"score_map/kd_loss", "ce_loss"} <= set(out)
    assert all(p.grad is not None for p in distiller.heads.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert lines[-1] == "note: the student's 8×8 score map is average-pooled to 4×4 before the score-map head"


def test_the_loss_is_ce_on_the_upsampled_output_ignoring_255_plus_the_weighted_head():
    distiller = _distiller("kd").train()
    images, masks = _batch()
    out = distiller(images, masks)
    with torch.no_grad():
        student_scores = distiller.student(images)["out"]  # LR-ASPP: no dropout, so train mode repeats itself
    assert student_scores.shape == (2, CLASSES, IMAGE, IMAGE)
    torch.testing.assert_close(out["ce_loss"], F.cross_entropy(student_scores, masks, ignore_index=255))
    torch.testing.assert_close(out["loss"].detach(), out["ce_loss"] + out["score_map/kd_loss"])


def test_resnet50_teacher_and_mobilenet_student_with_the_papers_segmentation_head():
    lines = []
    distiller = _distiller("diffkd", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", lines.append).train()
    assert lines == ["score-map head (DiffKD, dist distance, τ = 1): student classifier 11×4×4 -> teacher "
                     "classifier 11×8×8",
                     "note: the teacher's 8×8 score map is average-pooled to 4×4 before the score-map head"]
    head = distiller.heads["score_map"]
    assert isinstance(head, DiffKDHead) and head.distance == "dist" and not head.use_ae and head.kernel_size == 3
    assert (head.kd_weight, head.diffusion_weight, head.width) == (1.0, 1.0, CLASSES)
    out = distiller(*_batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in distiller.heads.parameters())


def test_segmentation_settings_and_refusals(tmp_path):
    diffkd = method_settings("diffkd", "fashion-scenes", task="segmentation")
    assert (diffkd.logit_distance, diffkd.kd_weight, diffkd.diffusion_weight, diffkd.ae_channels) == ("dist", 1, 1, 0)
    kd = method_settings("kd", "fashion-scenes", task="segmentation")
    assert (kd.ce_weight, kd.kd_weight, kd.kd_temperature) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="method 'mse' does not apply to segmentation"):
        method_settings("mse", "fashion-scenes", task="segmentation")
    with pytest.raises(ValueError, match="'fashion-scenes' is a detection / segmentation dataset"):
        method_settings("kd", "fashion-scenes")
    student = build_segmenter(STUDENT, num_classes=CLASSES)
    with pytest.raises(ValueError, match="predicts 11 classes and the teacher .* 7: class-score maps"):
        build_segmentation_distiller(diffkd, student, build_segmenter(STUDENT, num_classes=7), input_size=INPUT)
    with pytest.raises(ValueError, match="unknown segmentation model 'deeplabv3_resnet18'"):
        build_segmenter("deeplabv3_resnet18", num_classes=CLASSES)
    path = save_checkpoint_benchmark_format(student, tmp_path / "student.pth")
    loaded = build_segmenter(STUDENT, num_classes=CLASSES, checkpoint=path)
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in student.state_dict().items())
    with pytest.raises(ValueError, match="does not fit"):
        build_segmenter(STUDENT, num_classes=7, checkpoint=path)


def test_evaluate_segmentation_counts_every_pixel_but_the_ignored_ones():
    student = build_segmenter(STUDENT, num_classes=CLASSES).train()
    batches = [_batch(), _batch(batch=1)]
    metric = SegmentationMetric(CLASSES)
    confusion = evaluate_segmentation(student, batches, "cpu", metric=metric)["confusion"]
    assert student.training and confusion is metric.confusion
    student.eval()
    expected = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    with torch.no_grad():
        for images, masks in batches:
            predicted = student(images)["out"].argmax(1)
            for truth, guess in zip(masks.flatten().tolist(), predicted.flatten().tolist()):
                if truth != IGNORE_INDEX:
                    expected[truth, guess] += 1
    assert torch.equal(confusion, expected)
    assert confusion.sum() == 3 * (IMAGE - 5) * IMAGE


def test_segmenters_keep_pytorchs_batchnorm_momentum():
    # torchvision's MobileNetV3 uses 0.01; from random weights its eval-mode predictions then collapse for hundreds
    # of steps (every pixel background) while the train-mode ones are good.
    model = build_segmenter("lraspp_mobilenet_v3_large", num_classes=3)
    momenta = {module.momentum for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_diffkd_distils_models_of_fewer_than_8_classes_with_a_1x1_head(classes):
    # The spatial head's 3×3 noise adapter needs 8 channels; below that the head switches to 1×1 convolutions.
    settings = method_settings("diffkd", "segfolder", task="segmentation")
    distiller = build_segmentation_distiller(settings, build_segmenter(STUDENT, num_classes=classes),
                                             build_segmenter(STUDENT, num_classes=classes), input_size=INPUT,
                                             log=lambda line: None).train()
    head = distiller.heads["score_map"]
    assert head.kernel_size == 1 and head.width == classes
    masks = torch.randint(0, classes, (2, IMAGE, IMAGE))
    out = distiller(torch.randn(2, *INPUT), masks)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in distiller.heads.parameters())
    assert _distiller("diffkd").heads["score_map"].kernel_size == 3  # 11 classes keep the spatial head
