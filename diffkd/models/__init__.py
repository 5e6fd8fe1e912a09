"""Models for distillation: the CIFAR benchmark's zoo, timm models, torchvision detectors and segmentation models,
checkpoints and feature taps.

>>> teacher = create_model("resnet32x4", checkpoint="save/models/resnet32x4_vanilla/ckpt_epoch_240.pth")
>>> student = create_model("resnet8x4")
>>> feature_tap, logits_tap = default_taps("resnet8x4", student)      # ("layer3", "fc")
>>> probe_taps(student, [feature_tap, logits_tap])                   # {"layer3": (1, 256, 8, 8), "fc": (1, 100)}
"""
from diffkd._lazy import lazy_attributes
from diffkd.models.checkpoint import (CheckpointInfo, describe_architecture, load_checkpoint,
                                      save_checkpoint_benchmark_format, unwrap_model)
from diffkd.models.cifar import CifarNet
from diffkd.models.factory import create_model, list_cifar_models
from diffkd.models.taps import (FeatureLogitTaps, FeatureTaps, TapSet, default_taps, describe_spatial_match, entry_tap,
                                infer_input_size, match_spatial, probe_taps, to_feature_map, tokens_to_map)

# The dense models need torchvision: imported on first use.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "diffkd.models.detection": ("DETECTION_BACKBONES", "DETECTORS", "FPNLevel", "build_detector", "evaluate_detection",
                                "fpn_levels", "match_fpn_levels"),
    "diffkd.models.segmentation": ("SEGMENTERS", "build_segmenter", "evaluate_segmentation"),
})

__all__ = [
    "create_model", "list_cifar_models", "CifarNet",
    "load_checkpoint", "save_checkpoint_benchmark_format", "CheckpointInfo", "unwrap_model", "describe_architecture",
    "build_detector", "DETECTORS", "DETECTION_BACKBONES", "fpn_levels", "match_fpn_levels", "FPNLevel",
    "evaluate_detection", "build_segmenter", "SEGMENTERS", "evaluate_segmentation",
    "FeatureTaps", "FeatureLogitTaps", "TapSet", "default_taps", "probe_taps", "infer_input_size", "entry_tap",
    "tokens_to_map", "to_feature_map", "match_spatial", "describe_spatial_match",
]
