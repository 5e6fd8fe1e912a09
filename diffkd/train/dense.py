"""Detection and segmentation in the loop (``--task detection|segmentation``): torchvision detectors distilled on
every FPN level, DeepLabV3 / LR-ASPP distilled on their class-score maps, with COCO mAP and mIoU on the test set.

Models are named like torchvision's builders: detectors ``fasterrcnn_resnet50_fpn``, ``retinanet_resnet18_fpn``,
``fcos_resnet34_fpn`` (any of ResNet-18 … 152), segmenters ``deeplabv3_resnet50``,
``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``.  Weights are random, or a teacher's come from
``--teacher-ckpt`` (loaded strictly); nothing is downloaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from diffkd.data.dense import detection_collate, segmentation_collate
from diffkd.data.recipes import build_dense_datasets
from diffkd.data.scenes import SceneConfig
from diffkd.distill import build_detection_distiller, build_segmentation_distiller
from diffkd.methods import SETTING_NAMES, SPATIAL_HEAD_MIN_WIDTH, diffkd_head_kernel_size, method_settings
from diffkd.metrics import DetectionEvaluator, SegmentationMetric
from diffkd.models.checkpoint import unwrap_model
from diffkd.models.detection import DETECTION_BACKBONES, DETECTORS, build_detector, evaluate_detection
from diffkd.models.segmentation import SEGMENTERS, build_segmenter, evaluate_segmentation, score_map_output
from diffkd.train.build import Data, check_backend, load_data
from diffkd.train.errors import UsageError
from diffkd.train.runtime import Precision, Runtime, StopRequest
from diffkd.train.tasks import move_images, stoppable

# Scenes generated when --train-subset / --val-subset do not say (fashion-scenes).
DEFAULT_SCENES = {"train": 2000, "test": 500}
PREDICTION_IMAGES = 4  # test images drawn in plots/predictions.png


def _dense_data(args: argparse.Namespace, runtime: Runtime, task: str, collate, test_only: bool) -> Data:
    def datasets():
        options = {}
        if args.dataset == "fashion-scenes":
            # Scene i depends only on its index, so N scenes are the first N of any larger set.
            options = dict(train_scenes=args.train_subset or DEFAULT_SCENES["train"],
                           test_scenes=args.val_subset or DEFAULT_SCENES["test"])
            if args.image_size:
                options["config"] = SceneConfig(image_size=args.image_size)
        elif args.dataset == "segfolder":
            options = dict(num_classes=args.num_classes, crop_size=args.image_size)
        train_ds, val_ds, info = build_dense_datasets(task, args.dataset, args.data_dir, augment_seed=args.seed,
                                                      **options)
        info.setdefault("image_size", args.image_size)
        return train_ds, val_ds, info

    scenes = args.dataset == "fashion-scenes"
    return load_data(args, runtime, datasets, test_only=test_only, in_memory=scenes, subsets=not scenes,
                     collate=collate, what=f"{args.dataset} ({task})")


def _built(what: str, build):
    try:
        return build()
    except (OSError, ValueError) as error:
        raise UsageError(f"{what}: {error}") from None


class DenseTask:
    """What detection and segmentation share: building the run from the task's model builders, lists of targets,
    no per-batch accuracy, no chance level, and the predictions drawn at the end of a run."""

    name = ""
    task_loss = "ce_loss"
    example_student = ""
    collate = None

    @classmethod
    def build_data(cls, args: argparse.Namespace, runtime: Runtime, *, test_only: bool = False) -> Data:
        return _dense_data(args, runtime, cls.name, cls.collate, test_only)

    @classmethod
    def build_model(cls, args: argparse.Namespace, info: dict, runtime: Runtime) -> nn.Module:
        if not args.student:
            raise UsageError(f"--student is required, e.g. --student {cls.example_student}")
        values = {name: getattr(args, name) for name in SETTING_NAMES if name != "method"}
        try:
            settings = method_settings(args.method, args.dataset, task=cls.name, **values)
        except ValueError as error:
            raise UsageError(str(error)) from None
        check_backend(settings.backend if settings.method == "diffkd" else None, runtime.device)
        torch.manual_seed(args.seed)
        student = cls.create_student(args.student, info, args=args)
        teacher = None
        if settings.method != "none":
            if not args.teacher or not args.teacher_ckpt:
                raise UsageError(f"method {args.method!r} needs --teacher and --teacher-ckpt (a trained {cls.name} "
                                 f"model; train one with --method none --student NAME); use --method none to train a "
                                 f"model alone")
            teacher = cls.create_student(args.teacher, info, args.teacher_ckpt, args=args)
        distiller = _built(f"{cls.name} distillation", lambda: cls.distiller(settings, student, teacher, args, info,
                                                                             runtime.log))
        for name in SETTING_NAMES:  # the resolved method settings go into args.yaml
            setattr(args, name, getattr(settings, name))
        return distiller

    @staticmethod
    def batch_size(targets) -> int:
        return len(targets)

    @staticmethod
    def train_metrics(out: dict, targets) -> dict:
        return {}

    @staticmethod
    def near_chance(metrics: dict, info: dict) -> str | None:
        return None

    @classmethod
    def draw(cls, models: dict[str, nn.Module], dataset, info: dict, device: torch.device, path: Path) -> None:
        """plots/predictions.png: the first test images, their ground truth and each model's predictions, in columns
        named for what the models are: "teacher <name>" and "student <name>", or "<name> (trained alone)" in a run
        without teacher (which may be training a teacher)."""
        samples = [dataset[index] for index in range(min(PREDICTION_IMAGES, len(dataset)))]
        predictions = {}
        for role, model in models.items():
            name = getattr(unwrap_model(model), "arch_name", type(unwrap_model(model)).__name__)
            label = f"{role} {name}" if "teacher" in models else f"{name} (trained alone)"
            was_training = model.training
            model.eval()
            with torch.no_grad():
                predictions[label] = cls.predict(model, [image for image, _ in samples], device)
            model.train(was_training)
        cls.draw_predictions(samples, predictions, info, path)


def parse_detector(name: str) -> tuple[str, str]:
    """("fasterrcnn", "resnet18") from "fasterrcnn_resnet18_fpn"."""
    parts = name.split("_")
    if len(parts) != 3 or parts[0] not in DETECTORS or parts[1] not in DETECTION_BACKBONES or parts[2] != "fpn":
        examples = ", ".join(f"{architecture}_resnet50_fpn" for architecture in DETECTORS)
        raise UsageError(f"unknown detector {name!r}: detectors are named <detector>_<backbone>_fpn, e.g. {examples} "
                         f"(backbones {', '.join(DETECTION_BACKBONES)})")
    return parts[0], parts[1]


class DetectionTask(DenseTask):
    name = "detection"
    metric = "map"
    metric_label = "mAP"
    task_loss = "detection_loss"
    example_student = "retinanet_resnet18_fpn"
    collate = staticmethod(detection_collate)

    @staticmethod
    def create_student(name: str, info: dict, checkpoint: str | None = None, *, args=None) -> nn.Module:
        architecture, backbone = parse_detector(name)
        size = info.get("image_size") or (args.image_size if args is not None else None)
        if not size:
            raise UsageError(f"detector {name}: pass --image-size (the side images are resized to, e.g. 800 for "
                             f"COCO)")
        options = dict(num_classes=info["num_classes"], image_size=size,
                       fpn_channels=getattr(args, "fpn_channels", None) or 256)
        if "mean" in info:
            options.update(image_mean=info["mean"], image_std=info["std"])
        return _built(f"detector {name!r}", lambda: build_detector(architecture, backbone, checkpoint=checkpoint,
                                                                     **options))

    @staticmethod
    def distiller(settings, student, teacher, args, info, log) -> nn.Module:
        return build_detection_distiller(settings, student, teacher, image_size=info.get("image_size") or
                                         args.image_size, share_head=args.share_head, log=log)

    @staticmethod
    def to_device(batch, device: torch.device, channels_last: bool):
        images, targets = batch
        return ([image.to(device, non_blocking=True) for image in images],
                [{key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                  for key, value in target.items()} for target in targets])

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"mAP {metrics['map']:.2f}, mAP@.5 {metrics['map50']:.2f}"

    @staticmethod
    def evaluate(model: nn.Module, loader, runtime: Runtime, precision: Precision, channels_last: bool,
                 stop: StopRequest | None = None) -> dict:
        """COCO box mAP@[.5:.95] and mAP@.5 (%) of ``model`` on the loader's images, over all processes."""
        evaluator = DetectionEvaluator.for_dataset(loader.dataset)
        result = evaluate_detection(model, stoppable(loader, runtime, stop), runtime.device, precision.autocast)
        evaluator.update(result["predictions"], result["image_ids"])
        if runtime.distributed:
            states: list = [None] * runtime.world_size
            dist.all_gather_object(states, evaluator.state())
            evaluator = DetectionEvaluator.for_dataset(loader.dataset)
            for state in states:
                evaluator.merge_state(state)
        if evaluator.background_dropped:
            runtime.log(f"evaluation: {evaluator.background_dropped} detection(s) labelled 0 (the background slot, "
                        f"which RetinaNet and FCOS also score) left out, as no COCO category is 0")
        return evaluator.compute()

    @staticmethod
    def predict(model: nn.Module, images: list, device: torch.device) -> list:
        return [{key: value.cpu() for key, value in detection.items()}
                for detection in model([image.to(device) for image in images])]

    @staticmethod
    def draw_predictions(samples: list, predictions: dict, info: dict, path: Path) -> None:
        from diffkd.plots_dense import draw_detections
        draw_detections([image for image, _ in samples], [target for _, target in samples], predictions, path,
                        info["classes"])


class SegmentationTask(DenseTask):
    name = "segmentation"
    metric = "miou"
    metric_label = "mIoU"
    example_student = "lraspp_mobilenet_v3_large"
    collate = staticmethod(segmentation_collate)

    @staticmethod
    def create_student(name: str, info: dict, checkpoint: str | None = None, *, args=None) -> nn.Module:
        if name not in SEGMENTERS:
            raise UsageError(f"unknown segmentation model {name!r}; choose one of {', '.join(SEGMENTERS)}")
        return _built(f"segmentation model {name!r}",
                      lambda: build_segmenter(name, num_classes=info["num_classes"], checkpoint=checkpoint))

    @staticmethod
    def distiller(settings, student, teacher, args, info, log) -> nn.Module:
        size = info.get("image_size") or args.image_size or 512
        if settings.method == "diffkd" and diffkd_head_kernel_size(settings, info["num_classes"], spatial=True,
                                                                   autoencoder=False) == 1:
            log(f"note: {info['num_classes']} classes: the score-map DiffKD head uses 1×1 convolutions (kernel_size "
                f"1, the paper's logit variant, applied at every position), as its 3×3 noise adapter needs at least "
                f"{SPATIAL_HEAD_MIN_WIDTH} channels")
        return build_segmentation_distiller(settings, student, teacher, input_size=(3, size, size),
                                            ignore_index=info.get("ignore_index", 255), log=log)

    @staticmethod
    def to_device(batch, device: torch.device, channels_last: bool):
        images, masks = batch
        return move_images(images, device, channels_last), masks.to(device, non_blocking=True)

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_accuracy']:.2f}%"

    @staticmethod
    def evaluate(model: nn.Module, loader, runtime: Runtime, precision: Precision, channels_last: bool,
                 stop: StopRequest | None = None) -> dict:
        """mIoU and pixel accuracy (%) of ``model`` over every pixel of the loader, over all processes."""
        metric = SegmentationMetric(len(loader.dataset.classes), device=runtime.device)
        evaluate_segmentation(model, stoppable(loader, runtime, stop), runtime.device, precision.autocast,
                              metric=metric)
        runtime.all_reduce_sum(metric.confusion)
        result = metric.compute()
        return {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}

    @staticmethod
    def predict(model: nn.Module, images: list, device: torch.device) -> list:
        """One image at a time: validation images keep their own sizes, which need not agree."""
        return [score_map_output(model(image[None].to(device))).argmax(1)[0].cpu() for image in images]

    @staticmethod
    def draw_predictions(samples: list, predictions: dict, info: dict, path: Path) -> None:
        from diffkd.plots_dense import draw_segmentation
        draw_segmentation([image for image, _ in samples], [target["semantic"] for _, target in samples],
                          predictions, path, info["classes"], mean=info.get("mean"), std=info.get("std"))
