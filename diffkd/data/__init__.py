"""Datasets and loaders: Fashion-MNIST (IDX files), CIFAR-100 (python format, read safely), ImageFolder trees;
for detection and segmentation, `fashion-scenes` (Fashion-MNIST items composed into scenes), COCO-format
folders and images/masks folder pairs.

Typical use::

    train_ds, val_ds, info = build_datasets("cifar100", "/data", augment_seed=seed)
    train_loader = build_loader(train_ds, 64, train=True, seed=seed, distributed=ddp)
    for epoch in range(start_epoch, epochs):
        train_loader.sampler.set_epoch(epoch)   # order and augmentation of this epoch, also without DDP
        ...

    train_ds, val_ds, info = build_dense_datasets("detection", "fashion-scenes", augment_seed=seed)
    train_loader = build_loader(train_ds, 8, train=True, seed=seed, collate_fn=detection_collate)
"""
from diffkd._lazy import lazy_attributes

# Every reader on first use: the loaders need numpy, PIL and torchvision, COCO needs its evaluation packages.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "diffkd.data.cifar": ("CIFAR100", "load_restricted_pickle"),
    "diffkd.data.coco": ("CocoDetection", "build_coco_datasets", "load_coco_instances"),
    "diffkd.data.dense": ("IGNORE_INDEX", "detection_collate", "segmentation_collate"),
    "diffkd.data.fashion_mnist": ("DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "FashionMNIST"),
    "diffkd.data.idx": ("read_idx",),
    "diffkd.data.imagefolder": ("ImageFolder",),
    "diffkd.data.in_memory": ("InMemoryImageDataset", "TensorImageTransform", "sample_keys"),
    "diffkd.data.loaders": ("EpochShuffleSampler", "ShardSampler", "build_loader", "subset"),
    "diffkd.data.recipes": ("CIFAR100_MEAN", "CIFAR100_STD", "DATASET_NAMES", "DETECTION_DATASET_NAMES",
                            "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD",
                            "SEGMENTATION_DATASET_NAMES", "build_datasets", "build_dense_datasets"),
    "diffkd.data.scenes": ("SCENE_CLASSES", "SCENES_MEAN", "SCENES_STD", "FashionScenes", "SceneConfig", "Scenes",
                           "build_scene_datasets", "generate_scenes"),
    "diffkd.data.segfolder": ("SegmentationFolder", "build_segfolder_datasets"),
})

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "DATASET_NAMES",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "read_idx", "load_restricted_pickle", "FashionMNIST", "CIFAR100", "ImageFolder",
    "InMemoryImageDataset", "TensorImageTransform", "sample_keys",
    "EpochShuffleSampler", "ShardSampler", "build_loader", "subset", "build_datasets",
    "DETECTION_DATASET_NAMES", "SEGMENTATION_DATASET_NAMES", "build_dense_datasets", "IGNORE_INDEX",
    "detection_collate", "segmentation_collate", "SCENE_CLASSES", "SCENES_MEAN", "SCENES_STD", "SceneConfig",
    "Scenes", "FashionScenes", "generate_scenes", "build_scene_datasets", "CocoDetection", "load_coco_instances",
    "build_coco_datasets", "SegmentationFolder", "build_segfolder_datasets",
]
