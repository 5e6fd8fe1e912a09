"""The datasets of each training recipe (the paper's CIFAR-100 and ImageNet ones, ours for Fashion-MNIST and the
scenes) with their augmentation and normalisation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms

from diffkd.data.cifar import CIFAR100
from diffkd.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, FashionMNIST
from diffkd.data.imagefolder import ImageFolder
from diffkd.data.in_memory import TensorImageTransform

DATASET_NAMES = ("fashion-mnist", "cifar100", "imagenet")

# Fashion-MNIST's training-set statistics (checked against the data in tests/test_data.py).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _in_memory_pair(dataset_class: type, root: str | Path, mean: tuple, std: tuple, crop_padding: int,
                    train_transform: bool, augment_seed: int) -> tuple[Dataset, Dataset]:
    plain = TensorImageTransform(mean, std)
    augmented = TensorImageTransform(mean, std, crop_padding=crop_padding, horizontal_flip=True)
    train_ds = dataset_class(root, train=True, transform=augmented if train_transform else plain,
                             augment_seed=augment_seed)
    return train_ds, dataset_class(root, train=False, transform=plain)


def _imagenet_pair(root: str | Path, train_transform: bool, augment_seed: int) -> tuple[Dataset, Dataset]:
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    plain = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), *normalize])
    augmented = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                    *normalize])
    train_ds = ImageFolder(root, train=True, transform=augmented if train_transform else plain,
                           augment_seed=augment_seed)
    val_ds = ImageFolder(root, train=False, transform=plain)
    if train_ds.classes != val_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(val_ds.classes))[:5]
        only_val = sorted(set(val_ds.classes) - set(train_ds.classes))[:5]
        raise ValueError(f"ImageFolder: {root}/train has {len(train_ds.classes)} class folders and {root}/val "
                         f"has {len(val_ds.classes)}, and they differ (only in train, first 5: {only_train}; "
                         f"only in val: {only_val}); labels would not line up. Both splits need the same "
                         f"class folders.")
    return train_ds, val_ds


def build_datasets(name: str, data_dir: str | Path | None = None, *, train_transform: bool = True,
                   augment_seed: int = 0) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """The training and validation datasets of `name` (one of DATASET_NAMES) and a dict of facts about them:
    num_classes, in_chans, image_size, mean and std.

    Training augmentation (disable with `train_transform=False`): Fashion-MNIST random crop 28 with padding 2
    and flip; CIFAR-100 random crop 32 with padding 4 and flip; ImageNet RandomResizedCrop 224 and flip.
    Validation: normalisation only, or for ImageNet resize 256 + center crop 224. `data_dir` defaults to the
    Debian package's folder for Fashion-MNIST and is required for the others. `augment_seed` keys the
    training augmentation (see diffkd.data.in_memory).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if data_dir is None and name != "fashion-mnist":
        raise ValueError(f"{name} has no default location: pass --data-dir (data_dir=...) with the folder holding it")
    if name == "fashion-mnist":
        train_ds, val_ds = _in_memory_pair(FashionMNIST, data_dir or DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_MEAN,
                                           FASHION_MNIST_STD, 2, train_transform, augment_seed)
        info = dict(num_classes=10, in_chans=1, image_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    elif name == "cifar100":
        train_ds, val_ds = _in_memory_pair(CIFAR100, data_dir, CIFAR100_MEAN, CIFAR100_STD, 4, train_transform,
                                           augment_seed)
        info = dict(num_classes=100, in_chans=3, image_size=32, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    else:
        train_ds, val_ds = _imagenet_pair(data_dir, train_transform, augment_seed)
        info = dict(num_classes=len(train_ds.classes), in_chans=3, image_size=224, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD)
    return train_ds, val_ds, info


# Dense prediction: names for `--task detection` and `--task segmentation`, kept apart from DATASET_NAMES (the
# classification datasets).
DETECTION_DATASET_NAMES = ("fashion-scenes", "coco")
SEGMENTATION_DATASET_NAMES = ("fashion-scenes", "segfolder")


def build_dense_datasets(task: str, name: str, data_dir: str | Path | None = None, *, train_transform: bool = True,
                         augment_seed: int = 0, **options: Any) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """The training and validation datasets of a detection or segmentation `task` and a dict of facts about them
    (num_classes with the background, classes, in_chans, ...; see each builder). `options` go to the builder:
    diffkd.data.scenes.build_scene_datasets (train_scenes, test_scenes, seed, config),
    diffkd.data.coco.build_coco_datasets, or diffkd.data.segfolder.build_segfolder_datasets (num_classes,
    crop_size, scan_masks). Collate batches with diffkd.data.dense's detection_collate or segmentation_collate.
    """
    # Imported here: segfolder takes its default statistics from this module.
    from diffkd.data.coco import build_coco_datasets
    from diffkd.data.scenes import build_scene_datasets
    from diffkd.data.segfolder import build_segfolder_datasets

    names = {"detection": DETECTION_DATASET_NAMES, "segmentation": SEGMENTATION_DATASET_NAMES}
    if task not in names:
        raise ValueError(f"unknown task {task!r}; choose detection or segmentation")
    if name not in names[task]:
        raise ValueError(f"unknown {task} dataset {name!r}; choose one of {', '.join(names[task])}")
    if data_dir is None and name != "fashion-scenes":
        raise ValueError(f"{name} has no default location: pass --data-dir (data_dir=...) with the folder holding it")
    common = dict(train_transform=train_transform, augment_seed=augment_seed, **options)
    if name == "fashion-scenes":
        return build_scene_datasets(data_dir, task=task, **common)
    if name == "coco":
        return build_coco_datasets(data_dir, **common)
    return build_segfolder_datasets(data_dir, **common)
