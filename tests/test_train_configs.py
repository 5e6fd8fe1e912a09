"""configs/: every file parses as flags, names models that exist, and holds the paper's recipes and loss weights."""
from pathlib import Path

import pytest
import timm
import yaml

from diffkd.methods import SETTING_NAMES, method_settings
from diffkd.models import list_cifar_models
from diffkd.models.segmentation import SEGMENTERS
from diffkd.train.cli import parse_args
from diffkd.train.dense import parse_detector
from diffkd.train.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("none", "kd", "dist", "mse", "diffkd")
CIFAR_PAIRS = ("resnet32x4_resnet8x4", "resnet56_resnet20", "wrn_40_2_wrn_40_1", "ResNet50_MobileNetV2",
               "resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2", "wrn_40_2_wrn_16_2")
IMAGENET_PAIRS = ("resnet34_resnet18", "resnet50_mobilenetv1")
A1 = dict(epochs=240, batch_size=64, opt="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4,
          decay_norm_bias=True, sched="multistep", decay_milestones=[150, 180, 210], decay_rate=0.1,
          warmup_epochs=0.0)
B1 = dict(epochs=100, batch_size=256, lr=0.1, opt="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4,
          decay_norm_bias=False, sched="step", decay_epochs=30, decay_rate=0.1, warmup_epochs=0.0)
# configs/torchdistill/ holds torchdistill's own format (tests/test_integration_torchdistill.py builds it), not flags.
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "torchdistill")


DETECTION = {f"detection/coco/{m}/{a}_resnet50_resnet18.yaml" for m in ("none", "mse", "diffkd")
             for a in ("fasterrcnn", "retinanet", "fcos")}
SEGMENTATION = {f"segmentation/segfolder/{m}/deeplabv3_resnet50_mobilenet_v3_large.yaml"
                for m in ("none", "kd", "dist", "diffkd")}
DEMOS = {"demo.yaml", "detection/demo.yaml", "segmentation/demo.yaml"}


def _model_exists(name: str) -> bool:
    if name in SEGMENTERS:
        return True
    try:
        parse_detector(name)
        return True
    except UsageError:
        return name in list_cifar_models() or timm.is_model(name)


def test_every_pair_and_method_has_a_config():
    expected = {f"cifar100/{m}/{p}.yaml" for m in METHODS for p in CIFAR_PAIRS}
    expected |= {f"imagenet/{m}/{p}.yaml" for m in METHODS for p in IMAGENET_PAIRS}
    found = {str(path.relative_to(CONFIGS)) for path in ALL_CONFIGS}
    assert expected | DETECTION | SEGMENTATION | DEMOS <= found
    assert found - expected - DETECTION - SEGMENTATION == DEMOS | {
        f"cifar100/teachers/{t}.yaml" for t in ("resnet32x4", "resnet56", "wrn_40_2", "ResNet50")}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_and_names_existing_models(path):
    args, explicit = parse_args(["-c", str(path)])  # unknown keys or bad values raise UsageError
    assert explicit == set(yaml.safe_load(path.read_text()))
    for role in ("student", "teacher"):
        name = getattr(args, role)
        assert name is None or _model_exists(name), f"{role} {name!r}"


@pytest.mark.parametrize("path", [p for p in ALL_CONFIGS if p.parent.name in METHODS and
                                  p.parent.parent.name in ("cifar100", "imagenet")],
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_holds_the_papers_recipe_and_the_methods_spec_weights(path):
    args, _ = parse_args(["-c", str(path)])
    dataset, method, pair = path.parent.parent.name, path.parent.name, path.stem
    assert (args.dataset, args.method) == (dataset, method)
    recipe = A1 if dataset == "cifar100" else B1
    assert {key: getattr(args, key) for key in recipe} == recipe
    if dataset == "cifar100":
        small_lr = args.student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert args.lr == (0.01 if small_lr else 0.05)
        assert pair.endswith("_" + args.student)
        if method != "none":
            assert pair == f"{args.teacher}_{args.student}" and args.teacher_ckpt
    elif method != "none":
        assert args.teacher_pretrained and args.teacher.endswith(".tv_in1k")
    defaults = method_settings(method, dataset)
    assert {key: getattr(args, key) for key in SETTING_NAMES if getattr(args, key) is not None} == {
        key: getattr(defaults, key) for key in SETTING_NAMES if getattr(args, key) is not None}


@pytest.mark.parametrize("path", sorted((CONFIGS / "cifar100" / "teachers").glob("*.yaml")), ids=lambda p: p.stem)
def test_teacher_configs_train_the_teacher_alone(path):
    args, _ = parse_args(["-c", str(path)])
    assert (args.method, args.student, args.lr) == ("none", path.stem, 0.05)
    assert {key: getattr(args, key) for key in A1} == A1


@pytest.mark.parametrize("path", sorted(DETECTION | SEGMENTATION))
def test_dense_configs_hold_the_papers_loss_weights(path):
    path = CONFIGS / path
    args, _ = parse_args(["-c", str(path)])
    task, dataset, method = path.parts[-4:-1]
    assert (args.task, args.dataset, args.method) == (task, dataset, method)
    defaults = method_settings(method, dataset, task=task)
    assert {key: getattr(args, key) for key in SETTING_NAMES if getattr(args, key) is not None} == {
        key: getattr(defaults, key) for key in SETTING_NAMES if getattr(args, key) is not None}
    if method == "diffkd":
        assert (args.kd_weight, args.diffusion_weight, args.ae_channels) == (1.0, 1.0, 0)
    if task == "detection" and method != "none":  # channel norm + weight 1: measured, see the configs' headers
        assert args.feature_norm == "channel"
        assert task == "detection" or args.logit_distance == "dist"
    assert (args.teacher is None) == (method == "none")
    assert args.student.endswith("resnet18_fpn" if task == "detection" else "mobilenet_v3_large")
