"""A user's own dense data: COCO-format detection folders and images/masks segmentation folders, written here with
PIL; each bad input is refused with a message naming the problem."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffkd.data import (CocoDetection, SegmentationFolder, build_coco_datasets, build_dense_datasets, build_loader,
                         build_segfolder_datasets, detection_collate, segmentation_collate)
from diffkd.data.in_memory import sample_keys
from diffkd.metrics import DetectionEvaluator

# --- COCO ----------------------------------------------------------------------------------------------------------

IMAGES = [{"id": 101, "file_name": "a.png", "width": 20, "height": 16},
          {"id": 102, "file_name": "b.jpg", "width": 24, "height": 12},
          {"id": 103, "file_name": "c.png", "width": 10, "height": 10}]  # no annotation: a negative
CATEGORIES = [{"id": 9, "name": "boot"}, {"id": 4, "name": "bag"}]  # ids not sorted, not contiguous
ANNOTATIONS = [
    {"id": 1, "image_id": 101, "category_id": 4, "bbox": [2, 3, 5, 6], "iscrowd": 0},
    {"id": 2, "image_id": 101, "category_id": 9, "bbox": [-0.5, 8, 12, 8.5], "iscrowd": 0},  # within 1 px: clipped
    {"id": 3, "image_id": 102, "category_id": 9, "bbox": [10, 0, 14, 12], "area": 100.0, "iscrowd": 0},
    {"id": 4, "image_id": 102, "category_id": 4, "bbox": [0, 0, 6, 6], "iscrowd": 1},
]


def write_coco(root: Path, *, split: str = "train", folder: str = "train", json_name: str = "instances_train.json",
               annotations=ANNOTATIONS, images=IMAGES, skip_file: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for image in images:
        if image["file_name"] != skip_file:
            pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / image["file_name"])
    (root / "annotations" / json_name).write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    write_coco(tmp_path)
    return write_coco(tmp_path, split="val", folder="val", json_name="instances_val.json")


def test_coco_loads_with_contiguous_labels_negatives_and_crowds_out_of_training(coco_dir):
    train_ds, val_ds, info = build_coco_datasets(coco_dir, train_transform=False)
    assert info["num_classes"] == 3 and info["classes"] == ("background", "bag", "boot")
    assert info["category_ids"] == (4, 9) and len(train_ds) == len(val_ds) == 3
    image, target = train_ds[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32 and image.max() <= 1
    with Image.open(coco_dir / "train" / "a.png") as original:
        assert torch.equal((image * 255).round().byte(), torch.from_numpy(np.array(original)).permute(2, 0, 1))
    assert target["image_id"] == 101 and target["labels"].tolist() == [1, 2]  # category 4 -> 1, 9 -> 2
    assert target["boxes"].tolist() == [[2, 3, 7, 9], [0, 8, 11.5, 16]]  # xyxy, the second clipped to the image
    _, crowded = train_ds[1]
    assert crowded["labels"].tolist() == [2] and crowded["boxes"].tolist() == [[10, 0, 24, 12]]
    _, negative = train_ds[2]
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)
    ground_truth = val_ds.coco_ground_truth()
    assert {a["id"] for a in ground_truth["annotations"]} == {1, 2, 3, 4}  # the crowd one too
    assert next(a for a in ground_truth["annotations"] if a["id"] == 2)["bbox"] == [0, 8, 11.5, 8]


def test_coco_flip_mirrors_image_and_boxes_per_seed_epoch_index(coco_dir):
    plain = CocoDetection(coco_dir, train=True)
    flipping = CocoDetection(coco_dir, train=True, horizontal_flip=True, augment_seed=1)
    seen = set()
    for epoch in range(4):
        flipping.set_epoch(epoch)
        flipped = bool(sample_keys(1, epoch, [0])[0] >> np.uint64(63))
        seen.add(flipped)
        image, target = flipping[0]
        expected_image, expected = plain[0]
        if flipped:
            expected_image = expected_image.flip(-1)
            boxes = expected["boxes"]
            expected["boxes"] = torch.stack([20 - boxes[:, 2], boxes[:, 1], 20 - boxes[:, 0], boxes[:, 3]], 1)
        assert torch.equal(image, expected_image) and torch.equal(target["boxes"], expected["boxes"])
    assert seen == {True, False}


def test_coco_2017_names_are_accepted(tmp_path):
    write_coco(tmp_path, folder="train2017", json_name="instances_train2017.json")
    write_coco(tmp_path, split="val", folder="val2017", json_name="instances_val2017.json")
    train_ds, val_ds, _ = build_dense_datasets("detection", "coco", tmp_path)
    assert train_ds.images_dir.name == "train2017" and len(val_ds) == 3


def test_coco_ground_truth_and_evaluator_score_perfect_predictions_100(coco_dir):
    _, val_ds, _ = build_coco_datasets(coco_dir)
    evaluator = DetectionEvaluator.for_dataset(val_ds)
    loader = build_loader(val_ds, 2, train=False, collate_fn=detection_collate, pin_memory=False)
    for images, targets in loader:
        assert len(images) == len(targets) and images[0].dim() == 3
        predictions = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
                       for t in targets]
        # A detection on the crowd region of image 102 is ignored, not counted as a false positive.
        predictions = [p if t["image_id"] != 102 else {key: torch.cat([value, extra]) for (key, value), extra in zip(
            p.items(), (torch.tensor([[0.0, 0, 6, 6]]), torch.tensor([1]), torch.tensor([1.0])))}
            for p, t in zip(predictions, targets)]
        evaluator.update(predictions, targets)
    assert evaluator.compute() == {"map": pytest.approx(100), "map50": pytest.approx(100)}


def _with(annotation_changes: dict, index: int = 0) -> list[dict]:
    annotations = [dict(a) for a in ANNOTATIONS]
    annotations[index].update(annotation_changes)
    return annotations


@pytest.mark.parametrize("changes, message", [
    ({"bbox": [15, 3, 7, 6]}, r"reaches outside its 20×16 image by more than 1 pixel"),
    ({"bbox": [-2, 3, 5, 6]}, r"reaches outside"),
    ({"bbox": [2, 3, 0, 6]}, r"non-positive width or height"),
    ({"bbox": [2, 3, 5, -1]}, r"non-positive width or height"),
    ({"category_id": 5}, r"unknown category id 5; the categories are \[4, 9\]"),
    ({"image_id": 999}, r"its image id is not among the JSON's images"),
    ({"bbox": [1, 2, 3]}, r"'bbox' must be \[x, y, width, height\]"),
    ({"id": 2}, r"unique integer 'id'"),
])
def test_coco_bad_annotations_are_refused(tmp_path, changes, message):
    write_coco(tmp_path, annotations=_with(changes))
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, train=True)


def test_coco_missing_files_and_layouts_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        CocoDetection(tmp_path, train=True)
    write_coco(tmp_path, skip_file="b.jpg")
    with pytest.raises(ValueError, match=r"b\.jpg of image id 102 is missing"):
        CocoDetection(tmp_path, train=True)
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(ValueError, match="several annotation files"):
        CocoDetection(tmp_path, train=True)
    (tmp_path / "annotations" / "instances_train2017.json").unlink()
    (tmp_path / "annotations" / "instances_val.json").write_text("{not json")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(tmp_path, train=False)
    with pytest.raises(ValueError, match="has no default location"):
        build_dense_datasets("detection", "coco")
    with pytest.raises(ValueError, match="unknown segmentation dataset 'coco'; choose one of fashion-scenes, segf"):
        build_dense_datasets("segmentation", "coco", tmp_path)


def test_coco_image_of_another_size_than_its_json_says_is_refused_when_built(tmp_path):
    images = [dict(IMAGES[0], width=21)] + IMAGES[1:]
    write_coco(tmp_path, images=images)
    Image.new("RGB", (20, 16)).save(tmp_path / "train" / "a.png")
    with pytest.raises(ValueError, match=r"image id 101: .*a\.png is 20×16 pixels but the JSON says 21×16"):
        CocoDetection(tmp_path, train=True)


def _truncate(path: Path) -> None:
    """Cut the file's last 40 bytes: its header still reads, the pixel data ends early (an interrupted copy)."""
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("damage, message", [
    (lambda folder: _truncate(folder / "b.jpg"), r"b\.jpg: the JPEG file is truncated"),
    (lambda folder: _truncate(folder / "a.png"), r"a\.png: the PNG file is truncated"),
    (lambda folder: (folder / "c.png").write_bytes(b"not an image"), r"c\.png: not a readable image"),
])
def test_coco_unreadable_or_truncated_images_are_refused_when_built(tmp_path, damage, message):
    write_coco(tmp_path)
    damage(tmp_path / "train")
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, train=True)


def test_eval_loaders_batch_images_of_one_size_together(coco_dir):
    images = [dict(IMAGES[i % 2], id=200 + i, file_name=IMAGES[i % 2]["file_name"]) for i in range(5)]
    write_coco(coco_dir, split="val", folder="val", json_name="instances_val.json", images=images, annotations=[])
    val_ds = CocoDetection(coco_dir, train=False)
    assert val_ds.image_sizes() == [(16, 20), (12, 24)] * 2 + [(16, 20)]
    batches = [[t["image_id"] for t in targets] for _, targets in
               build_loader(val_ds, 2, train=False, collate_fn=detection_collate)]
    assert batches == [[200, 202], [204], [201, 203]]
    loader = build_loader(val_ds, 8, train=False, collate_fn=detection_collate)
    assert len(loader) == 2 and [len(targets) for _, targets in loader] == [3, 2]


# --- segmentation folders ------------------------------------------------------------------------------------------

def block_mask(height: int, width: int, seed: int) -> np.ndarray:
    """Class ids 0..2 in 4×4 blocks, with one ignored block."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 3, (-(-height // 4), -(-width // 4))).astype(np.uint8)
    blocks[0, 0] = 255
    return np.kron(blocks, np.ones((4, 4), np.uint8))[:height, :width]


def write_segfolder(root: Path, sizes=((16, 20), (12, 12), (20, 8))) -> Path:
    """Images whose red channel is 60 × the class id (so alignment with the mask can be checked), masks in mode P."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            mask = block_mask(height, width, i)
            image = np.zeros((height, width, 3), np.uint8)
            image[..., 0] = np.where(mask == 255, 250, mask * 60)
            Image.fromarray(image).save(root / "images" / split / f"s{i}.png")
            palette_mask = Image.fromarray(mask, mode="L").convert("P")
            palette_mask.save(root / "masks" / split / f"s{i}.png")
    (root / "classes.txt").write_text("background\nshirt\nbag\n")
    return root


def test_segfolder_loads_images_and_masks(tmp_path):
    root = write_segfolder(tmp_path)
    train_ds, val_ds, info = build_segfolder_datasets(root, train_transform=False)
    assert info["num_classes"] == 3 and info["classes"] == ("background", "shirt", "bag")
    image, target = val_ds[0]
    assert image.shape == (3, 16, 20) and target["semantic"].shape == (16, 20)
    assert torch.equal(target["semantic"], torch.from_numpy(block_mask(16, 20, 0)).long())
    mean, std = info["mean"][0], info["std"][0]
    torch.testing.assert_close(image[0], torch.from_numpy(np.array(Image.open(root / "images/val/s0.png"))[..., 0]
                                                          ).float() / 255 / std - mean / std)
    images, semantic = segmentation_collate([val_ds[i] for i in range(3)])
    assert images.shape == (3, 3, 20, 20) and semantic[1, 12:].eq(255).all()
    assert val_ds.image_sizes() == [(16, 20), (12, 12), (20, 8)] and val_ds.select([2]).image_sizes() == [(20, 8)]
    assert [tuple(images.shape[2:]) for images, _ in build_loader(val_ds, 4, train=False,
                                                                   collate_fn=segmentation_collate)] == \
        [(16, 20), (12, 12), (20, 8)]  # one size per evaluation batch: nothing padded


def test_segfolder_scale_crop_flip_keep_image_and_mask_aligned(tmp_path):
    root = write_segfolder(tmp_path, sizes=((40, 48), (36, 36)))
    dataset = SegmentationFolder(root, train=True, crop_size=24, horizontal_flip=True, augment_seed=2,
                                 mean=(0, 0, 0), std=(1, 1, 1))
    crops = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        image, target = dataset[0]
        assert image.shape == (3, 24, 24) and target["semantic"].shape == (24, 24)
        semantic = target["semantic"]
        labelled = semantic != 255
        # Where the mask says class c, the image's red channel is 60·c (bilinear blur only at block edges).
        agreement = ((image[0] * 255 / 60).round().long() == semantic)[labelled].float().mean()
        assert labelled.sum() > 100 and agreement > 0.8
        again, again_target = dataset[0]
        assert torch.equal(image, again) and torch.equal(semantic, again_target["semantic"])
        crops.append(image)
    assert not torch.equal(crops[0], crops[1]) or not torch.equal(crops[1], crops[2])


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "masks/train/s1.png").unlink(), r"1 image\(s\) in .* without a mask \(s1.png\)"),
    (lambda root: Image.new("L", (4, 4)).save(root / "masks/train/extra.png"), r"1 mask\(s\) .* without an image"),
    (lambda root: Image.new("L", (5, 5)).save(root / "masks/train/s0.png"),
     r"s0.png is 5×5 but its image .* is 20×16"),
    (lambda root: Image.fromarray(np.full((16, 20), 3, np.uint8)).save(root / "masks/train/s0.png"),
     r"class ids \[3\] are >= num_classes \(3\)"),
    (lambda root: Image.new("RGB", (20, 16)).save(root / "masks/train/s0.png"), r"found mode RGB"),
    (lambda root: Image.new("RGB", (20, 16)).save(root / "images/train/s0.jpg"), r"share the stem 's0'"),
    (lambda root: (root / "classes.txt").write_text("a\nb\n"), r"names 2 classes but num_classes is 3"),
    (lambda root: _truncate(root / "images/train/s2.png"), r"s2\.png: the PNG file is truncated"),
])
def test_segfolder_mismatches_are_refused(tmp_path, damage, message):
    root = write_segfolder(tmp_path)
    damage(root)
    with pytest.raises(ValueError, match=message):
        SegmentationFolder(root, train=True, num_classes=3)


def test_segfolder_needs_a_class_count_and_its_folders(tmp_path):
    root = write_segfolder(tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(ValueError, match="give the number of classes"):
        SegmentationFolder(root, train=True)
    assert len(SegmentationFolder(root, train=True, num_classes=3).classes) == 3
    with pytest.raises(FileNotFoundError, match="images/val is missing"):
        SegmentationFolder(tmp_path / "masks", train=False, num_classes=3)


def test_detections_do_not_depend_on_the_evaluation_batch_size_on_mixed_sizes(coco_dir):
    from diffkd.models import build_detector, evaluate_detection
    images = [dict(IMAGES[i % 2], id=200 + i) for i in range(6)]  # 20×16 and 24×12 in turn
    write_coco(coco_dir, split="val", folder="val", json_name="instances_val.json", images=images,
               annotations=[dict(ANNOTATIONS[0], image_id=200 + i, id=10 + i) for i in range(6)])
    val_ds = CocoDetection(coco_dir, train=False)
    torch.manual_seed(0)
    model = build_detector("fasterrcnn", "resnet18", num_classes=3, image_size=64, fpn_channels=32)

    def predictions(batches) -> dict:
        result = evaluate_detection(model, batches, "cpu")
        return dict(zip(result["image_ids"], result["predictions"]))

    def mean_ap(by_image: dict) -> dict:
        evaluator = DetectionEvaluator.for_dataset(val_ds)
        evaluator.update(list(by_image.values()), list(by_image))
        return evaluator.compute()

    alone, grouped = (predictions(build_loader(val_ds, batch, train=False, collate_fn=detection_collate))
                      for batch in (1, 8))
    assert sorted(alone) == sorted(grouped) == [200 + i for i in range(6)]
    assert sum(len(p["scores"]) for p in alone.values()) > 0
    for image_id, prediction in alone.items():
        torch.testing.assert_close(grouped[image_id], prediction, rtol=1e-4, atol=1e-4)
    assert mean_ap(alone) == pytest.approx(mean_ap(grouped), abs=1e-9)
    # One batch of both sizes pads the smaller images, which changes their detections: what grouping avoids.
    mixed = predictions([detection_collate([val_ds[i] for i in range(len(val_ds))])])
    assert any(mixed[i]["scores"].shape != alone[i]["scores"].shape
               or not torch.allclose(mixed[i]["scores"], alone[i]["scores"], atol=1e-4) for i in alone)
