"""diffkd.metrics: COCO box mAP on hand-made cases whose answer is derived by hand (with both COCO backends),
merging per-rank states, and mIoU / pixel accuracy on a hand-computed confusion matrix."""
from __future__ import annotations

import math

import pytest
import torch

from diffkd.metrics import COCO_BACKENDS, DetectionEvaluator, SegmentationMetric

# Two categories with non-contiguous COCO ids: label 1 is category 7 ("cat"), label 2 is category 3 ("dog").
CATEGORY_IDS = (7, 3)
GROUND_TRUTH = {
    "images": [{"id": 10, "width": 100, "height": 80}, {"id": 20, "width": 100, "height": 80},
               {"id": 30, "width": 100, "height": 80}],
    "annotations": [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [50, 40, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 3, "image_id": 20, "category_id": 3, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
    ],
    "categories": [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}],
}
CAT_BOXES = [[10, 10, 30, 30], [50, 40, 80, 60]]
DOG_BOX = [0, 0, 40, 40]


def detections(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def nothing() -> dict[str, torch.Tensor]:
    return detections([], [], [])


@pytest.fixture(params=COCO_BACKENDS)
def backend(request):
    """Every case runs with both COCO backends: the same hand-derived answer from each."""
    return request.param


def evaluate(backend, per_image: dict[int, dict]) -> dict[str, float]:
    evaluator = DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS, backend=backend)
    evaluator.update(list(per_image.values()), list(per_image))
    return evaluator.compute()


def test_perfect_predictions_score_100(backend):
    result = evaluate(backend, {10: detections(CAT_BOXES, [0.9, 0.8], [1, 1]), 20: detections([DOG_BOX], [0.7], [2]),
                                30: nothing()})
    assert result == {"map": pytest.approx(100), "map50": pytest.approx(100)}


def test_one_of_two_objects_missed_gives_51_of_101_recall_points(backend):
    # Cats: one of two found, so precision is 1 up to recall 0.5 and 0 beyond: COCO's 101 recall points
    # 0, 0.01, ..., 0.5 score 1 -> AP 51/101. Dogs: perfect, 100. The mean of the two categories:
    expected = (51 / 101 * 100 + 100) / 2
    result = evaluate(backend, {10: detections(CAT_BOXES[:1], [0.9], [1]), 20: detections([DOG_BOX], [0.7], [2]),
                                30: nothing()})
    assert result["map"] == pytest.approx(expected) and result["map50"] == pytest.approx(expected)


def test_a_wrong_class_scores_nothing_for_its_category(backend):
    # Image 10's cats labelled dog: cat AP 0. Dogs: the true dog (score 0.9) ranks above the two false ones, so the
    # dog precision is 1 at recall 1 -> 100; mean 50. With the false dogs ranked first the precision at recall 1 is
    # 1/3 -> dog AP 33.3, mean 16.7.
    first = evaluate(backend, {10: detections(CAT_BOXES, [0.5, 0.4], [2, 2]), 20: detections([DOG_BOX], [0.9], [2])})
    assert first["map"] == pytest.approx(50) and first["map50"] == pytest.approx(50)
    last = evaluate(backend, {10: detections(CAT_BOXES, [0.5, 0.4], [2, 2]), 20: detections([DOG_BOX], [0.1], [2])})
    assert last["map"] == pytest.approx(100 / 3 / 2)


def test_partial_overlap_counts_at_the_iou_thresholds_it_reaches(backend):
    # The dog box 40×40 predicted as 40×24.8: IoU 0.62 -> a hit at thresholds 0.5, 0.55, 0.6 of the ten.
    result = evaluate(backend, {20: detections([[0, 0, 40, 24.8]], [0.9], [2])})
    assert result["map"] == pytest.approx(30) and result["map50"] == pytest.approx(100)


def test_labels_map_to_category_ids(backend):
    # The same perfect boxes with the labels swapped put cats in category 3 and dogs in 7: nothing is right.
    swapped = evaluate(backend, {10: detections(CAT_BOXES, [0.9, 0.8], [2, 2]), 20: detections([DOG_BOX], [0.7], [1])})
    assert swapped == {"map": 0.0, "map50": 0.0}


def test_only_images_seen_are_evaluated_and_empty_results_are_zero_or_nan(backend):
    assert evaluate(backend, {20: detections([DOG_BOX], [0.7], [2])})["map"] == pytest.approx(100)
    assert evaluate(backend, {10: nothing(), 20: nothing()}) == {"map": 0.0, "map50": 0.0}
    no_ground_truth = evaluate(backend, {30: detections([[0, 0, 5, 5]], [0.5], [1])})
    assert math.isnan(no_ground_truth["map"]) and math.isnan(no_ground_truth["map50"])


def test_merged_rank_states_equal_one_evaluator():
    whole = DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS)
    ranks = [DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS) for _ in range(2)]
    batches = [({10: detections(CAT_BOXES[:1] + [[0, 0, 9, 9]], [0.9, 0.95], [1, 1])}, 0),
               ({20: detections([DOG_BOX, [5, 5, 30, 30]], [0.6, 0.7], [2, 2]), 30: nothing()}, 1)]
    for batch, rank in batches:
        whole.update(list(batch.values()), [{"image_id": image_id} for image_id in batch])
        ranks[rank].update(list(batch.values()), list(batch))
    merged = DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS)
    for evaluator in ranks:
        merged.merge_state(evaluator.state())
    assert merged.compute() == whole.compute()
    assert 0 < whole.compute()["map"] < 100
    with pytest.raises(ValueError, match="evaluated twice"):
        merged.merge_state(ranks[0].state())


def test_detections_labelled_background_are_dropped_and_counted(backend):
    # RetinaNet and FCOS score label 0 like any class: those detections are left out, the others scored as usual.
    evaluator = DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS, backend=backend)
    evaluator.update([detections([*CAT_BOXES, DOG_BOX], [0.9, 0.8, 0.95], [1, 1, 0]),
                      detections([DOG_BOX, DOG_BOX], [0.99, 0.7], [0, 2]), nothing()], [10, 20, 30])
    assert evaluator.background_dropped == 2
    assert evaluator.compute() == {"map": pytest.approx(100), "map50": pytest.approx(100)}
    merged = DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS, backend=backend)
    merged.merge_state(evaluator.state())
    assert merged.background_dropped == 2


def test_bad_detection_inputs_are_refused():
    evaluator = DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS)
    with pytest.raises(ValueError, match="no image was evaluated"):
        evaluator.compute()
    with pytest.raises(ValueError, match="labels must be in 1..2"):
        evaluator.update([detections([DOG_BOX], [0.5], [3])], [20])
    with pytest.raises(ValueError, match="one per image"):
        evaluator.update([nothing()], [10, 20])
    with pytest.raises(ValueError, match="evaluated twice"):
        evaluator.update([nothing(), nothing()], [10, 10])
    evaluator.update([nothing()], [99])
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.compute()
    with pytest.raises(ValueError, match="not among the ground truth's categories"):
        DetectionEvaluator(GROUND_TRUTH, (7, 4))
    with pytest.raises(ValueError, match="backend"):
        DetectionEvaluator(GROUND_TRUTH, CATEGORY_IDS, backend="detectron")


# --- segmentation --------------------------------------------------------------------------------------------------

TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PREDICTION = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_miou_and_pixel_accuracy_from_a_hand_computed_confusion_matrix():
    # Valid pixels (target, prediction): (0,0) (0,1) (1,1) (1,1) (2,0); the ignored pixel predicts 2.
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 0 / (1 + 0 - 0) = 0;
    # class 3 is in neither map: left out. mIoU = (1/3 + 2/3 + 0) / 3; pixel accuracy = 3 / 5.
    metric = SegmentationMetric(4)
    metric.update(PREDICTION, TARGET)
    assert metric.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    result = metric.compute()
    assert result["miou"] == pytest.approx(100 / 3) and result["pixel_accuracy"] == pytest.approx(60)
    assert result["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 0]) and math.isnan(result["iou"][3])


def test_scores_merging_and_bad_inputs():
    metric = SegmentationMetric(4)
    metric.update(torch.nn.functional.one_hot(PREDICTION, 4).permute(0, 3, 1, 2).float(), TARGET)
    other = SegmentationMetric(4)
    other.update(TARGET.clamp(max=3), TARGET)  # perfect on the valid pixels
    metric.merge(other)
    assert metric.compute()["pixel_accuracy"] == pytest.approx(80)  # (3 + 5) / 10
    all_ignored = SegmentationMetric(2)
    all_ignored.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    assert math.isnan(all_ignored.compute()["miou"]) and math.isnan(all_ignored.compute()["pixel_accuracy"])
    with pytest.raises(ValueError, match="prediction class ids must be in 0..2"):
        SegmentationMetric(3).update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target class ids"):
        SegmentationMetric(3).update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="shapes differ"):
        SegmentationMetric(3).update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot merge"):
        metric.merge(SegmentationMetric(3))
