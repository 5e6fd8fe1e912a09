"""fashion-scenes: generation (determinism, split separation, tight boxes, overlap bounds, consistent targets),
the dataset's flip augmentation, the loaders' collates, the builders and the PNG drawings.

Items are tiny generated 28×28 "garments" (textured blobs on black with a faint halo below the threshold), so
the tests do not need the Debian package; one test reads the real files when they are there.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

from diffkd.data import (SCENES_MEAN, SCENES_STD, EpochShuffleSampler, FashionScenes, SceneConfig, build_loader,
                         build_scene_datasets, detection_collate, generate_scenes, segmentation_collate, subset)
from diffkd.data.in_memory import sample_keys
from diffkd.plots_dense import draw_detections, draw_segmentation

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SMALL = SceneConfig(image_size=64, scale_range=(0.8, 2.0), max_items=4)


def make_items(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured ellipses and rectangles of random size; pixels 1..20 around them stay below the threshold."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:28, 0:28]
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for image in images:
        height, width = rng.integers(10, 25, 2)
        top, left = rng.integers(0, 28 - height + 1), rng.integers(0, 28 - width + 1)
        inside = (rows >= top) & (rows < top + height) & (columns >= left) & (columns < left + width)
        if rng.random() < 0.5:
            centre_y, centre_x = top + height / 2 - 0.5, left + width / 2 - 0.5
            inside &= ((rows - centre_y) / (height / 2)) ** 2 + ((columns - centre_x) / (width / 2)) ** 2 <= 1
        halo = F.max_pool2d(torch.from_numpy(inside).float()[None, None], 3, 1, 1)[0, 0].bool().numpy()
        image[halo] = rng.integers(1, 21, int(halo.sum()))
        image[inside] = rng.integers(60, 256, int(inside.sum()))
    return images, (np.arange(count) % 10).astype(np.uint8)


@pytest.fixture(scope="module")
def items():
    return {"train": make_items(40, seed=1), "test": make_items(20, seed=2)}


@pytest.fixture(scope="module")
def scenes(items):
    return generate_scenes(*items["train"], 24, split="train", seed=3, config=SMALL)


def render_item(items, split: str, source: int, placement) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The item as the scene should show it: (pixel values, mask, top, left), recomputed from the source image."""
    top, left, side, gain = (int(v) for v in placement)
    source_image = torch.from_numpy(items[split][0][source]).float()[None, None]
    scaled = F.interpolate(source_image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    scaled = scaled.round().clamp(0, 255)[0, 0].numpy().astype(np.int64)
    return scaled * gain // 255, scaled >= SMALL.threshold, top, left


def item_layers(items, scenes, index, split="train"):
    """Per item of a scene: its full mask on the canvas and its pixel values, recomputed from the sources."""
    size = scenes.config.image_size
    layers = []
    for source, placement in zip(scenes.source_indices[index], scenes.placements[index]):
        values, mask, top, left = render_item(items, split, int(source), placement)
        full_mask = np.zeros((size, size), dtype=bool)
        full_values = np.zeros((size, size), dtype=np.int64)
        full_mask[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
        full_values[top:top + mask.shape[0], left:left + mask.shape[1]] = values
        layers.append((full_mask, full_values))
    return layers


def write_idx_items(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


# --- generation ----------------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_scenes_another_seed_other_scenes(items, scenes):
    again = generate_scenes(*items["train"], 24, split="train", seed=3, config=SMALL)
    fewer = generate_scenes(*items["train"], 10, split="train", seed=3, config=SMALL)
    other = generate_scenes(*items["train"], 24, split="train", seed=4, config=SMALL)
    assert again.images.tobytes() == scenes.images.tobytes()
    assert again.instance_maps.tobytes() == scenes.instance_maps.tobytes()
    for column in ("labels", "boxes", "full_boxes", "source_indices", "placements"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(again, column), getattr(scenes, column)))
    # A scene depends on its index, not on how many scenes are made.
    assert fewer.images.tobytes() == scenes.images[:10].tobytes()
    assert (other.images != scenes.images).mean() > 0.5


def test_scene_pixels_are_the_recorded_items_of_their_own_split(items, scenes):
    """Every visible item pixel equals the scaled, dimmed source item of the training split (and would not be
    that of the test split's image with the same index)."""
    for index in range(len(scenes)):
        assert np.all(scenes.source_indices[index] < len(items["train"][0]))
        for j, (_, values) in enumerate(item_layers(items, scenes, index)):
            visible = scenes.instance_maps[index] == j + 1
            np.testing.assert_array_equal(scenes.images[index][visible], values[visible])
            source = int(scenes.source_indices[index][j])
            assert scenes.labels[index][j] == items["train"][1][source] + 1
            if source < len(items["test"][0]):
                wrong, *_ = render_item(items, "test", source, scenes.placements[index][j])
                top, left, side, _ = scenes.placements[index][j]
                window = visible[top:top + side, left:left + side]
                assert not np.array_equal(scenes.images[index][top:top + side, left:left + side][window],
                                          wrong[window])
    test_scenes = generate_scenes(*items["test"], 8, split="test", seed=3, config=SMALL)
    for index in range(len(test_scenes)):
        assert np.all(test_scenes.source_indices[index] < len(items["test"][0]))
        for j, (_, values) in enumerate(item_layers(items, test_scenes, index, split="test")):
            visible = test_scenes.instance_maps[index] == j + 1
            np.testing.assert_array_equal(test_scenes.images[index][visible], values[visible])


def test_masks_are_the_items_pixels_above_the_threshold_with_the_top_item_winning(items, scenes):
    for index in range(len(scenes)):
        expected = np.zeros_like(scenes.instance_maps[index])
        for j, (mask, _) in enumerate(item_layers(items, scenes, index)):
            expected[mask] = j + 1  # later items are drawn on top
        np.testing.assert_array_equal(scenes.instance_maps[index], expected)


def test_boxes_are_tight_around_the_visible_pixels(scenes):
    dataset = FashionScenes(scenes)
    for index in range(len(dataset)):
        _, target = dataset[index]
        for mask, box in zip(target["masks"].bool(), target["boxes"].long().tolist()):
            x1, y1, x2, y2 = box
            assert mask[y1:y2, x1:x2].sum() == mask.sum() > 0  # the mask lies inside its box
            assert mask[:, x1].any() and mask[:, x2 - 1].any() and mask[y1].any() and mask[y2 - 1].any()


def test_overlap_and_visibility_bounds_hold(items, scenes):
    for index in range(len(scenes)):
        full_boxes = torch.from_numpy(scenes.full_boxes[index])
        iou = box_iou(full_boxes, full_boxes)
        assert iou[~torch.eye(len(full_boxes), dtype=torch.bool)].le(SMALL.max_iou + 1e-6).all()
        for j, (mask, _) in enumerate(item_layers(items, scenes, index)):
            np.testing.assert_array_equal(scenes.full_boxes[index][j], _tight(mask))
            assert (scenes.instance_maps[index] == j + 1).sum() >= SMALL.min_visible * mask.sum()


def _tight(mask: np.ndarray) -> list[int]:
    columns, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]


def test_targets_agree_with_each_other(scenes):
    counts = [len(labels) for labels in scenes.labels]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    dataset = FashionScenes(scenes)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert torch.equal(image[0], image[2])
        masks, labels = target["masks"], target["labels"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(labels), 64, 64)
        assert masks.sum(0).max() <= 1  # disjoint
        assert labels.min() >= 1 and labels.max() <= 10
        assert torch.equal(target["semantic"], (masks.long() * labels[:, None, None]).sum(0))
        assert target["image_id"] == index and target["boxes"].dtype == torch.float32


def test_horizontal_flip_is_keyed_by_seed_epoch_index_and_keeps_targets_consistent(scenes):
    plain = FashionScenes(scenes)
    flipping = FashionScenes(scenes, horizontal_flip=True, augment_seed=5)
    flips = {}
    for epoch in (0, 1):
        flipping.set_epoch(epoch)
        keys = sample_keys(5, epoch, np.arange(len(scenes)))
        flips[epoch] = (keys >> np.uint64(63)).astype(bool)
        for index in range(len(scenes)):
            image, target = flipping[index]
            expected_image, expected = plain[index]
            if flips[epoch][index]:
                expected_image = expected_image.flip(-1)
                expected = {key: value.flip(-1) if key in ("masks", "semantic") else value
                            for key, value in expected.items()}
                expected["boxes"] = torch.tensor([_tight(mask.numpy()) for mask in expected["masks"].bool()],
                                                 dtype=torch.float32).reshape(-1, 4)
            assert torch.equal(image, expected_image)
            for key in ("boxes", "labels", "masks", "semantic"):
                assert torch.equal(target[key], expected[key]), key
    assert flips[0].any() and not flips[0].all() and (flips[0] != flips[1]).any()


def test_loaders_collate_detection_and_segmentation_batches(scenes):
    dataset = FashionScenes(scenes, horizontal_flip=True, mean=SCENES_MEAN, std=SCENES_STD)
    loader = build_loader(dataset, 4, train=True, seed=0, collate_fn=detection_collate, pin_memory=False)
    assert isinstance(loader.sampler, EpochShuffleSampler)
    reference_sampler = EpochShuffleSampler(dataset, seed=0)
    reference_sampler.set_epoch(3)
    order = list(reference_sampler)[:4]
    dataset.set_epoch(0)
    loader.sampler.set_epoch(3)
    assert dataset.epoch == 3
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 4 and images[0].shape == (3, 64, 64)
    for image, target, index in zip(images, targets, order):
        assert target["image_id"] == index and torch.equal(image, dataset[index][0])
    loader = build_loader(dataset, 5, train=False, collate_fn=segmentation_collate, pin_memory=False)
    batches = list(loader)
    assert sum(images.shape[0] for images, _ in batches) == len(dataset)
    images, semantic = batches[0]
    assert images.shape == (5, 3, 64, 64) and semantic.shape == (5, 64, 64) and semantic.dtype == torch.int64
    assert torch.equal(semantic[1], dataset[1][1]["semantic"])


def test_segmentation_collate_pads_images_with_zero_and_maps_with_ignore():
    batch = [(torch.ones(3, 4, 6), {"semantic": torch.ones(4, 6, dtype=torch.int64)}),
             (torch.ones(3, 5, 3), {"semantic": torch.full((5, 3), 2, dtype=torch.int64)})]
    images, semantic = segmentation_collate(batch)
    assert images.shape == (2, 3, 5, 6) and semantic.shape == (2, 5, 6)
    assert images[0, :, 4].eq(0).all() and images[1, :, :, 3:].eq(0).all() and images[1, :, :, :3].eq(1).all()
    assert semantic[0, 4].eq(255).all() and semantic[1, :, 3:].eq(255).all() and semantic[0, :4].eq(1).all()


def test_subset_keeps_the_scene_ids(scenes):
    dataset = FashionScenes(scenes)
    chosen = subset(dataset, 5, seed=1)
    assert isinstance(chosen, FashionScenes) and len(chosen) == 5
    ids = chosen.scenes.scene_ids.tolist()
    for position, scene_id in enumerate(ids):
        image, target = chosen[position]
        assert target["image_id"] == scene_id and torch.equal(image, dataset[scene_id][0])
    assert [image["id"] for image in chosen.coco_ground_truth()["images"]] == ids


def test_build_scene_datasets_reads_each_split_from_its_idx_files(items, tmp_path):
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx_items(tmp_path, prefix, *items[split])
    config = SceneConfig(image_size=64)
    train_ds, test_ds, info = build_scene_datasets(tmp_path, train_scenes=6, test_scenes=4, seed=3, config=config)
    assert (len(train_ds), len(test_ds), info["num_classes"], info["image_size"]) == (6, 4, 11, 64)
    assert train_ds.horizontal_flip and not test_ds.horizontal_flip
    assert set(train_ds[0][1]) == {"boxes", "labels", "image_id"}
    same_train = generate_scenes(*items["train"], 6, split="train", seed=3, config=config)
    same_test = generate_scenes(*items["test"], 4, split="test", seed=3, config=config)
    assert train_ds.scenes.images.tobytes() == same_train.images.tobytes()
    assert test_ds.scenes.images.tobytes() == same_test.images.tobytes()
    _, segmentation_test, _ = build_scene_datasets(tmp_path, train_scenes=2, test_scenes=4, seed=3, config=config,
                                                   task="segmentation")
    image, target = segmentation_test[0]
    assert set(target) == {"semantic", "image_id"}
    torch.testing.assert_close(image, (test_ds[0][0] - SCENES_MEAN[0]) / SCENES_STD[0])


def test_bad_settings_are_refused_with_the_fix(items):
    with pytest.raises(ValueError, match="smaller than the largest scaled item"):
        SceneConfig(image_size=40)
    with pytest.raises(ValueError, match="min_items"):
        SceneConfig(min_items=3, max_items=2)
    with pytest.raises(ValueError, match="split"):
        generate_scenes(*items["train"], 2, split="val")
    with pytest.raises(ValueError, match="not Fashion-MNIST"):
        generate_scenes(np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), 2, split="train")
    with pytest.raises(ValueError, match="unknown target keys"):
        FashionScenes(generate_scenes(*items["train"], 1, split="train", config=SMALL), target_keys=("boxes", "bbox"))
    with pytest.raises(ValueError, match="task"):
        build_scene_datasets(task="classification")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_items_give_the_documented_statistics_and_item_counts():
    train_ds, test_ds, info = build_scene_datasets(REAL_FASHION_MNIST, train_scenes=300, test_scenes=30)
    pixels = train_ds.scenes.images.astype(np.float64) / 255
    assert abs(pixels.mean() - info["mean"][0]) < 0.01 and abs(pixels.std() - info["std"][0]) < 0.01
    counts = np.bincount([len(labels) for labels in train_ds.scenes.labels], minlength=5)
    assert counts[0] == 0 and (counts[1:] > 30).all()
    assert np.all(np.concatenate(test_ds.scenes.source_indices) < 10_000)


# --- drawings --------------------------------------------------------------------------------------------------------

def test_drawings_have_a_row_per_image_and_a_column_per_result(scenes, tmp_path):
    dataset = FashionScenes(scenes)
    images, targets = zip(*(dataset[i] for i in range(3)))
    predictions = [{"boxes": t["boxes"] + 1, "labels": t["labels"],
                    "scores": torch.linspace(0.2, 0.9, len(t["labels"]))} for t in targets]
    path = draw_detections(images, targets, {"teacher": predictions, "student": predictions}, tmp_path / "d.png",
                           dataset.classes)
    with Image.open(path) as figure:
        width, height = figure.size
    assert width / height == pytest.approx(3 / 3, rel=0.05)
    semantics = [t["semantic"] for t in targets]
    path = draw_segmentation(images, semantics, {"student": [F.one_hot(s, 11).permute(2, 0, 1) for s in semantics]},
                             tmp_path / "s.png", dataset.classes)
    with Image.open(path) as figure:
        assert figure.size[0] / figure.size[1] == pytest.approx(3 / 3, rel=0.05)
    with pytest.raises(ValueError, match="one per image"):
        draw_detections(images, targets[:2], {}, tmp_path / "x.png", dataset.classes)
