"""diffkd.models: the CIFAR zoo, timm creation, checkpoints, feature taps and spatial matching."""
from __future__ import annotations

import argparse
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkd.models import (FeatureLogitTaps, create_model, default_taps, describe_spatial_match, list_cifar_models,
                           load_checkpoint, match_spatial, probe_taps, save_checkpoint_benchmark_format,
                           tokens_to_map)

NUM_CLASSES = 10


# ---- parameter counts from the benchmark's architecture descriptions (no nn.Module involved) ---------------------
def conv(cin, cout, k, groups=1, bias=False):
    return cin // groups * cout * k * k + (cout if bias else 0)


def bn(channels):
    return 2 * channels


def linear(cin, cout):
    return cin * cout + cout


def count_resnet(depth, widths, classes, chans):
    blocks, total, cin = (depth - 2) // 6, conv(chans, widths[0], 3) + bn(widths[0]), widths[0]
    for stage, width in enumerate(widths[1:]):
        for i in range(blocks):
            total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if (stage > 0 and i == 0) or cin != width:  # downsample: 1×1 conv + BN
                total += conv(cin, width, 1) + bn(width)
            cin = width
    return total + linear(cin, classes)


def count_resnet50(classes, chans):
    total, cin = conv(chans, 64, 3) + bn(64), 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            out = 4 * width
            total += conv(cin, width, 1) + bn(width) + conv(width, width, 3) + bn(width) + conv(width, out, 1) + bn(out)
            if (stride != 1 and i == 0) or cin != out:
                total += conv(cin, out, 1) + bn(out)
            cin = out
    return total + linear(cin, classes)


def count_wrn(depth, k, classes, chans):
    blocks, total, cin = (depth - 4) // 6, conv(chans, 16, 3), 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(blocks):
            total += bn(cin) + conv(cin, width, 3) + bn(width) + conv(width, width, 3)
            total += conv(cin, width, 1) if cin != width else 0
            cin = width
    return total + bn(cin) + linear(cin, classes)


VGG_CFG = {"vgg8": [[64], [128], [256], [512], [512]],
           "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
           "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
           "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
           "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}


def count_vgg(name, classes, chans):
    total, cin = 0, chans
    for block in VGG_CFG[name]:
        for width in block:
            total += conv(cin, width, 3, bias=True) + bn(width)
            cin = width
    return total + linear(512, classes)


def count_mobilenetv2(classes, chans):  # mobile_half: t = 6, width 0.5, 1280 last channels
    total, cin = conv(chans, 16, 3) + bn(16), 16
    for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)):
        for _ in range(n):
            hidden, out = cin * t, c // 2
            total += conv(cin, hidden, 1) + bn(hidden) + conv(hidden, hidden, 3, groups=hidden) + bn(hidden)
            total += conv(hidden, out, 1) + bn(out)
            cin = out
    return total + conv(cin, 1280, 1) + bn(1280) + linear(1280, classes)


def count_shufflev1(classes, chans, groups=3):
    total, cin = conv(chans, 24, 1) + bn(24), 24
    for width, blocks in ((240, 4), (480, 8), (960, 4)):
        for i in range(blocks):
            out = width - cin if i == 0 else width
            mid, first_groups = out // 4, 1 if cin == 24 else groups
            total += conv(cin, mid, 1, groups=first_groups) + bn(mid) + conv(mid, mid, 3, groups=mid) + bn(mid)
            total += conv(mid, out, 1, groups=groups) + bn(out)
            cin = width
    return total + linear(cin, classes)


def count_shufflev2(classes, chans):
    total, cin = conv(chans, 24, 1) + bn(24), 24
    for width, blocks in ((116, 3), (232, 7), (464, 3)):
        mid = width // 2
        total += conv(cin, cin, 3, groups=cin) + bn(cin) + conv(cin, mid, 1) + bn(mid)  # down unit, left
        total += conv(cin, mid, 1) + bn(mid) + conv(mid, mid, 3, groups=mid) + bn(mid) + conv(mid, mid, 1) + bn(mid)
        total += blocks * (conv(mid, mid, 1) + bn(mid) + conv(mid, mid, 3, groups=mid) + bn(mid)
                           + conv(mid, mid, 1) + bn(mid))
        cin = width
    return total + conv(cin, 1024, 1) + bn(1024) + linear(1024, classes)


SMALL, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
EXPECTED_PARAMS = {
    **{f"resnet{d}": (lambda c, ch, d=d: count_resnet(d, SMALL, c, ch)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda c, ch: count_resnet(8, WIDE, c, ch),
    "resnet32x4": lambda c, ch: count_resnet(32, WIDE, c, ch),
    "ResNet50": count_resnet50,
    **{f"wrn_{d}_{k}": (lambda c, ch, d=d, k=k: count_wrn(d, k, c, ch)) for d in (16, 40) for k in (1, 2)},
    **{name: (lambda c, ch, name=name: count_vgg(name, c, ch)) for name in VGG_CFG},
    "MobileNetV2": count_mobilenetv2,
    "ShuffleV1": count_shufflev1,
    "ShuffleV2": count_shufflev2,
}

# Side of the last map on 32×32 inputs: the kernel of the benchmark's fixed average pool (8 for the ResNets and
# WRNs, 4 for the ShuffleNets, 2 for MobileNetV2), or what its adaptive pools see (ResNet50, VGG).
LAST_MAP_SIDE = {**{name: 8 for name in EXPECTED_PARAMS if name.startswith("resnet")}, "ResNet50": 4,
                 **{name: 8 for name in EXPECTED_PARAMS if name.startswith("wrn")},
                 **{name: 4 for name in VGG_CFG}, "MobileNetV2": 2, "ShuffleV1": 4, "ShuffleV2": 4}


def num_params(model):
    return sum(parameter.numel() for parameter in model.parameters())


def test_formulas_reproduce_the_published_counts():
    """The counts papers quote for CIFAR-100 (in millions; some round, some truncate), from the formulas above."""
    published = {"resnet8x4": 1.23, "resnet32x4": 7.43, "resnet56": 0.86, "resnet20": 0.28, "wrn_40_2": 2.26,
                 "wrn_16_2": 0.70, "wrn_40_1": 0.57, "vgg13": 9.46, "vgg8": 3.96, "MobileNetV2": 0.81,
                 "ShuffleV1": 0.95, "ShuffleV2": 1.36, "ResNet50": 23.71}
    for name, millions in published.items():
        assert abs(EXPECTED_PARAMS[name](100, 3) / 1e6 - millions) < 0.01, name
    assert EXPECTED_PARAMS["resnet8x4"](100, 3) == 1_233_540


def test_zoo_names_are_the_benchmarks():
    assert list_cifar_models() == list(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", list_cifar_models())
def test_cifar_model(name):
    """Exact size; 32×32 and 28×28 inputs with 3 and 1 channels; the default feature tap is the post-ReLU map the
    head pools, of the benchmark's size."""
    model = create_model(name, num_classes=NUM_CLASSES)
    assert num_params(model) == EXPECTED_PARAMS[name](NUM_CLASSES, 3)
    feature_tap, logits_tap = default_taps(name, model)
    side = LAST_MAP_SIDE[name]
    with FeatureLogitTaps(model, feature_tap, logits_tap) as taps, torch.no_grad():
        for size in (32, 28):
            logits = model(torch.randn(2, 3, size, size))
            assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
            assert taps.logits is logits
            feature = taps.feature
            assert feature.dim() == 4 and feature.shape[0] == 2 and feature.min() >= 0
            if size == 32:
                assert feature.shape[-2:] == (side, side)
                # Adaptive pooling equals the benchmark's fixed kernel on the 32×32 map.
                pooled = F.avg_pool2d(feature, side, ceil_mode=True).flatten(1)
                torch.testing.assert_close(model.get_classifier()(pooled), logits)
            torch.testing.assert_close(model.forward_head(feature), logits)
    gray = create_model(name, num_classes=NUM_CLASSES, in_chans=1)
    assert num_params(gray) == EXPECTED_PARAMS[name](NUM_CLASSES, 1)
    with torch.no_grad():
        for size in (32, 28):
            assert gray(torch.randn(2, 1, size, size)).shape == (2, NUM_CLASSES)


BENCHMARK_KEYS = {
    "resnet8x4": {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                  "layer1.0.downsample.1.running_var": (64,), "layer3.0.conv2.weight": (256, 256, 3, 3),
                  "layer3.0.bn2.num_batches_tracked": (), "fc.weight": (100, 256)},
    "wrn_40_2": {"block1.layer.0.bn1.weight": (16,), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                 "block3.layer.5.conv2.weight": (128, 128, 3, 3), "bn1.running_mean": (128,), "fc.bias": (100,)},
    "vgg13": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.weight": (64,),
              "block0.3.weight": (64, 64, 3, 3), "block4.4.running_var": (512,), "classifier.weight": (100, 512)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.1.0.conv.3.weight": (48, 1, 3, 3), "blocks.6.0.conv.7.running_mean": (160,),
                    "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.weight": (100, 1280)},
    "ShuffleV1": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                  "layer1.0.conv3.weight": (216, 18, 1, 1), "layer2.0.conv1.weight": (60, 80, 1, 1),
                  "layer3.3.bn3.weight": (960,), "linear.weight": (100, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv2.weight": (58, 24, 1, 1),
                  "layer1.0.conv5.weight": (58, 58, 1, 1), "layer1.1.conv2.weight": (58, 1, 3, 3),
                  "layer3.3.bn3.weight": (232,), "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)},
    "ResNet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "linear.weight": (100, 2048)},
}
ABSENT_KEYS = {"wrn_40_2": "block2.layer.1.convShortcut.weight", "vgg13": "block0.5.weight",
               "resnet8x4": "layer2.0.relu.weight", "ResNet50": "layer1.1.shortcut.0.weight"}


@pytest.mark.parametrize("name", list(BENCHMARK_KEYS))
def test_state_dict_uses_the_benchmarks_names(name):
    state_dict = create_model(name).state_dict()
    assert {key: tuple(state_dict[key].shape) for key in BENCHMARK_KEYS[name] if key in state_dict} \
        == BENCHMARK_KEYS[name]
    assert ABSENT_KEYS.get(name, "no such key") not in state_dict


def deterministic_weights(model):
    """Every floating-point tensor of the state dict from a sine wave phased by its key's name (order-free)."""
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            phase = zlib.crc32(key.encode()) % 1000 / 100
            wave = torch.sin(torch.arange(tensor.numel(), dtype=torch.float64) * 0.7 + phase).reshape(tensor.shape)
            if key.endswith("running_var"):
                value = 1 + 0.5 * wave.abs()
            elif key.endswith(("running_mean", "bias")):
                value = 0.1 * wave
            elif tensor.dim() > 1:
                value = wave * (2 / tensor[0].numel()) ** 0.5
            else:
                value = 1 + 0.2 * wave
            tensor.copy_(value)
    return model


# Logits [0, 0], [1, 7], their sum and absolute sum, from the benchmark's own model code (HobbitLong/RepDistiller,
# models/) run in float64 eval mode with deterministic_weights on the sine input below.
BENCHMARK_LOGITS = {
    "resnet8": (-0.8888709319, -0.4055592162, -0.02271809193, 95.74118199),
    "resnet8x4": (-9.081395774, 4.522112456, 0.2712437401, 1002.13139),
    "wrn_16_1": (-126.7492752, -58.71302702, -22.75343456, 13336.27641),
    "vgg8": (12.32203417, -8.31031348, 45.89341969, 1661.421135),
    "MobileNetV2": (2.433370376, -2.585339356, 6.568003291, 488.8887303),
    "ShuffleV1": (-2.173548872, 3.355482164, 28.26609514, 422.9600292),
    "ShuffleV2": (-1.835703146, 2.081757558, -10.31371186, 267.7836894),
    "ResNet50": (39.23961328, -502.9681669, -2001.70855, 84699.52711),
}


@pytest.mark.parametrize("name", list(BENCHMARK_LOGITS))
def test_forward_matches_the_benchmark(name):
    model = deterministic_weights(create_model(name).double().eval())
    images = torch.sin(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.01).reshape(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    summary = (logits[0, 0].item(), logits[1, 7].item(), logits.sum().item(), logits.abs().sum().item())
    assert summary == pytest.approx(BENCHMARK_LOGITS[name], rel=1e-8, abs=1e-8)


# ---- create_model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, suggestion", [("resnet8X4", "'resnet8x4'"), ("ShuffleNetV2", "'ShuffleV2'"),
                                              ("mobilenetv1", "'mobilenetv1_100'")])
def test_unknown_name_lists_the_zoo_and_suggests(name, suggestion):
    with pytest.raises(ValueError, match=rf"unknown model name '{name}'\. Did you mean .*{suggestion}.*"
                                         r"CIFAR zoo: resnet8, .*ShuffleV2; any timm model name is accepted"):
        create_model(name)


def test_create_model_refuses_unusable_arguments(tmp_path):
    with pytest.raises(ValueError, match="no pretrained weights to fetch; pass the benchmark checkpoint"):
        create_model("resnet8x4", pretrained=True)
    with pytest.raises(ValueError, match=r"takes only num_classes and in_chans; got extra arguments \['img_size'\]"):
        create_model("resnet8x4", img_size=32)
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint="):
        create_model("resnet18", pretrained=True, checkpoint=tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        create_model("resnet20", num_classes=0)
    for pretrained in (False, True):
        with pytest.raises(ValueError, match=r"timm has no pretrained tag 'nope' for 'resnet34'; known: .*"
                                             r"resnet34\.tv_in1k"):
            create_model("resnet34.nope", pretrained=pretrained)


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    """Hugging Face and torch hub caches that point into tmp_path."""
    import huggingface_hub.constants

    hf_cache, hub_dir = tmp_path / "hf", tmp_path / "torch_hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    return hf_cache, hub_dir


def test_pretrained_without_cached_weights_points_at_checkpoint(empty_weight_caches):
    with pytest.raises(ValueError, match=r"pretrained weights for 'resnet18\.a1_in1k' are not in the local cache "
                                         r"\(Hugging Face cache: timm/resnet18\.a1_in1k/model\.safetensors.*"
                                         r"pass the weight file with checkpoint="):
        create_model("resnet18.a1_in1k", pretrained=True)


@pytest.mark.parametrize("cache", ["hugging_face", "torch_hub"])
def test_pretrained_uses_cached_weights(empty_weight_caches, cache):
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    hf_cache, hub_dir = empty_weight_caches
    name = "resnet18.tv_in1k"
    weights = {key: value.contiguous() for key, value in create_model("resnet18").state_dict().items()}
    if cache == "hugging_face":
        repo = hf_cache / f"models--timm--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abcd")
        (repo / "snapshots" / "0123abcd").mkdir(parents=True)
        save_file(weights, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    else:
        (hub_dir / "checkpoints").mkdir(parents=True)
        torch.save(weights, hub_dir / "checkpoints" / get_pretrained_cfg(name).url.rsplit("/", 1)[1])
    model = create_model(name, pretrained=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], msg=key)


def test_timm_model_by_tag_with_a_checkpoint_file(tmp_path):
    source = create_model("resnet18", num_classes=NUM_CLASSES)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "resnet18.pth")
    model = create_model("resnet18.tv_in1k", num_classes=NUM_CLASSES, checkpoint=tmp_path / "resnet18.pth")
    assert model.pretrained_cfg["tag"] == "tv_in1k"
    torch.testing.assert_close(model.fc.weight, source.fc.weight)


# ---- checkpoints ----------------------------------------------------------------------------------------------
def assert_same_weights(a, b):
    for (key, left), right in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(left, right, msg=key)


def test_benchmark_format_round_trip(tmp_path):
    teacher = create_model("resnet20")
    teacher.bn1.running_mean.uniform_()  # buffers travel too
    path = save_checkpoint_benchmark_format(teacher, tmp_path / "ckpt" / "ckpt_epoch_240.pth", epoch=240,
                                            accuracy=torch.tensor(69.06))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt_epoch_240.pth"]  # no temporary file left
    assert set(torch.load(path, weights_only=True)) == {"model", "epoch", "accuracy"}
    restored = create_model("resnet20", checkpoint=path)
    assert_same_weights(restored, teacher)
    info = load_checkpoint(create_model("resnet20"), path)
    assert info.weights_key == "model" and info.metadata["epoch"] == 240
    assert info.metadata["accuracy"] == pytest.approx(69.06)


@pytest.mark.parametrize("layout", ["ddp_state_dict", "student", "raw_compiled"])
def test_other_layouts_and_wrapper_prefixes(tmp_path, layout):
    source = create_model("resnet8")
    weights = source.state_dict()
    content = {"ddp_state_dict": {"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3},
               "student": {"student": weights, "teacher": {"x": torch.zeros(1)}},
               "raw_compiled": {f"_orig_mod.{k}": v for k, v in weights.items()}}[layout]
    torch.save(content, tmp_path / "weights.pth")
    model = create_model("resnet8")
    load_checkpoint(model, tmp_path / "weights.pth")
    assert_same_weights(model, source)


def test_ddp_like_wrapper_is_saved_without_prefix(tmp_path):
    model = create_model("resnet8")
    save_checkpoint_benchmark_format(nn.DataParallel(model), tmp_path / "wrapped.pth")
    assert all(not key.startswith("module.") for key in torch.load(tmp_path / "wrapped.pth")["model"])


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_checkpoint_benchmark_format(create_model("wrn_16_1"), tmp_path / "wrn.pth")
    with pytest.raises(ValueError, match=r"checkpoint '.*wrn\.pth' \(weights under 'model'\) does not fit the model "
                                         r"resnet8x4 \(CifarResNet\): \d+ missing key\(s\): layer1\.0\.conv1\.weight.*"
                                         r"unexpected key\(s\): block1\.layer\.0\.bn1\.weight.*shape mismatch\(es\): "
                                         r"conv1\.weight checkpoint \[16, 3, 3, 3\] vs model \[32, 3, 3, 3\].*"
                                         r"looks like it was made for a different architecture"):
        create_model("resnet8x4", checkpoint=tmp_path / "wrn.pth")


def test_checkpoint_of_a_deeper_variant_is_refused(tmp_path):
    save_checkpoint_benchmark_format(create_model("wrn_40_1"), tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"does not fit the model wrn_16_1 \(WideResNet\): \d+ unexpected key\(s\): "
                                         r"block1\.layer\.2\.bn1\.weight.* made for a deeper or larger variant"):
        create_model("wrn_16_1", checkpoint=tmp_path / "deep.pth")


def test_classifier_mismatch_names_the_class_count(tmp_path):
    save_checkpoint_benchmark_format(create_model("resnet8", num_classes=100), tmp_path / "c100.pth")
    with pytest.raises(ValueError, match=r"2 shape mismatch\(es\): fc\.weight checkpoint \[100, 64\] vs model "
                                         r"\[10, 64\].*trained for 100 classes; create the model with num_classes=100"):
        create_model("resnet8", num_classes=NUM_CLASSES, checkpoint=tmp_path / "c100.pth")
    model = create_model("resnet8", num_classes=NUM_CLASSES)
    info = load_checkpoint(model, tmp_path / "c100.pth", strict=False)
    assert info.mismatched == ["fc.bias", "fc.weight"] and not info.missing and not info.unexpected


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    source = create_model("resnet8")
    weights = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": weights}, tmp_path / "old.pth")
    model = create_model("resnet8")
    load_checkpoint(model, tmp_path / "old.pth")
    assert_same_weights(model, source)


def test_damaged_and_unusual_files(tmp_path):
    model = create_model("resnet8")
    good = save_checkpoint_benchmark_format(model, tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"checkpoint '.*truncated\.pth' could not be read .*truncated or corrupted"):
        load_checkpoint(model, truncated)
    with pytest.raises(FileNotFoundError, match=r"'.*absent\.pth' does not exist"):
        load_checkpoint(model, tmp_path / "absent.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.05)}, unsafe)
    with pytest.raises(ValueError, match=r"'.*unsafe\.pth' holds Python objects that torch\.load\(weights_only"):
        load_checkpoint(model, unsafe)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match=r"no weights under 'model', 'state_dict', 'student'.*'epoch', 'optimizer'"):
        load_checkpoint(model, tmp_path / "no_weights.pth")


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet8")
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    model = create_model("resnet8", checkpoint=tmp_path / "weights.safetensors")
    assert_same_weights(model, source)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match=r"'.*broken\.safetensors' could not be read"):
        load_checkpoint(model, tmp_path / "broken.safetensors")


def test_save_refuses_what_could_not_be_loaded_back(tmp_path):
    model = create_model("resnet8")
    with pytest.raises(ValueError, match="stores the weights under 'model'"):
        save_checkpoint_benchmark_format(model, tmp_path / "x.pth", model={})
    with pytest.raises(ValueError, match=r"extra entry 'args'\['when'\] has type object"):
        save_checkpoint_benchmark_format(model, tmp_path / "x.pth", args={"when": object()})
    assert not any(tmp_path.iterdir())


# ---- taps -----------------------------------------------------------------------------------------------------
def test_tap_names_are_checked_with_close_matches():
    model = create_model("resnet8x4")
    with pytest.raises(ValueError, match=r"resnet8x4 \(CifarResNet\) has no module named 'layer33'\. Close matches: "
                                         r"layer3.*top-level modules are: conv1, bn1, relu, layer1"):
        FeatureLogitTaps(model, "layer33", "fc")
    assert not any(module._forward_hooks for module in model.modules())  # the valid hook was not left behind


def test_taps_are_removed_on_exit_and_see_through_wrappers():
    model = create_model("resnet8")
    with FeatureLogitTaps(nn.DataParallel(model), "avgpool:input") as taps:
        model(torch.randn(2, 3, 32, 32))
        assert taps.feature.shape == (2, 64, 8, 8)
        with pytest.raises(RuntimeError, match="created without a logits module"):
            taps.logits
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    with FeatureLogitTaps(model, "layer3") as taps, pytest.raises(RuntimeError, match="has captured nothing yet"):
        taps.feature


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.act(self.conv(self.act(x)))


def test_probe_reports_shapes_restores_modes_and_refuses_ambiguous_taps():
    model = create_model("resnet8x4")
    model.train()
    model.layer1.eval()
    shapes = probe_taps(model, ["layer3", "fc", "layer2:input"], input_size=(3, 28, 28))
    assert shapes == {"layer3": (1, 256, 7, 7), "fc": (1, 100), "layer2:input": (1, 64, 28, 28)}
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(parameter.grad is None for parameter in model.parameters())
    assert probe_taps(model, "layer3") == {"layer3": (1, 256, 8, 8)}  # inferred 3×32×32
    with pytest.raises(ValueError, match=r"tap 'act' ran 2 times \(a shared module\)"):
        probe_taps(SharedReLU(), "act", input_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"tap 'unused' did not run"):
        probe_taps(SharedReLU(), "unused", input_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"dry forward of resnet8x4 \(CifarResNet\) on an input of shape "
                                         r"\(1, 1, 32, 32\) failed .*pass the input_size"):
        probe_taps(model, "layer3", input_size=(1, 32, 32))


def test_timm_resnet_taps():
    model = create_model("resnet18", num_classes=NUM_CLASSES)
    taps = default_taps("resnet18", model, input_size=(3, 64, 64))
    assert taps == ("layer4", "fc")
    assert probe_taps(model, taps, input_size=(3, 64, 64)) == {"layer4": (1, 512, 2, 2), "fc": (1, NUM_CLASSES)}


def test_timm_vit_taps_give_maps_without_the_class_token():
    model = create_model("test_vit", num_classes=NUM_CLASSES, img_size=32).eval()
    feature_tap, logits_tap = default_taps("test_vit", model)
    assert (feature_tap, logits_tap) == ("norm", "head")
    shapes = probe_taps(model, [feature_tap, logits_tap])
    channels = model.num_features
    side = 32 // model.patch_embed.patch_size[0]
    assert shapes == {"norm": (1, channels, side, side), "head": (1, NUM_CLASSES)}
    with FeatureLogitTaps(model, feature_tap, logits_tap) as taps, torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
        tokens = taps.captured("norm")
        assert tokens.shape == (2, model.num_prefix_tokens + side * side, channels)
        torch.testing.assert_close(taps.feature[:, :, 0, 1], tokens[:, model.num_prefix_tokens + 1])
        assert taps.logits is logits


class ChannelsLastNet(nn.Module):
    """A Swin-like model: NHWC features, a head that pools them."""

    output_fmt = "NHWC"

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward_features(self, x):
        return self.norm(self.embed(x).permute(0, 2, 3, 1))

    def forward_head(self, x):
        return self.head(x.mean(dim=(1, 2)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_channels_last_features_are_permuted():
    model = ChannelsLastNet()
    assert default_taps("channels-last", model, input_size=(3, 16, 16)) == ("norm", "head")
    with FeatureLogitTaps(model, "norm") as taps:
        model(torch.randn(2, 3, 16, 16))
        assert taps.feature.shape == (2, 6, 4, 4)
        torch.testing.assert_close(taps.feature[1, :, 2, 3], taps.captured("norm")[1, 2, 3])


def test_default_taps_need_the_feature_head_split():
    with pytest.raises(ValueError, match=r"cannot find default taps for 'plain'.*forward_features / forward_head"):
        default_taps("plain", SharedReLU())


# ---- tokens and spatial matching ------------------------------------------------------------------------------
def test_tokens_to_map():
    tokens = torch.randn(2, 9, 5)  # a 3×3 grid of 5 channels
    as_map = tokens_to_map(tokens)
    assert as_map.shape == (2, 5, 3, 3)
    torch.testing.assert_close(as_map[:, :, 1, 2], tokens[:, 5])
    with_class_token = torch.cat([torch.randn(2, 1, 5), tokens], dim=1)
    torch.testing.assert_close(tokens_to_map(with_class_token), as_map)
    with_registers = torch.cat([torch.randn(2, 5, 5), tokens], dim=1)
    torch.testing.assert_close(tokens_to_map(with_registers, num_prefix_tokens=5), as_map)
    with pytest.raises(ValueError, match=r"cannot arrange 14 tokens .* neither N = 14 nor N − 1 is a perfect square"):
        tokens_to_map(with_registers)
    with pytest.raises(ValueError, match="after dropping 2 prefix token"):
        tokens_to_map(with_class_token, num_prefix_tokens=2)
    channels_last = torch.randn(2, 4, 3, 7)
    torch.testing.assert_close(tokens_to_map(channels_last), channels_last.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"expects B×N×C tokens .* got shape \(2, 5\)"):
        tokens_to_map(torch.randn(2, 5))


def test_match_spatial_pools_the_larger_map():
    small, large = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 8, 8)
    student, teacher = match_spatial(small, large)  # ResNet32x4 teacher (8×8) → ShuffleNet student (4×4)
    assert student is small
    torch.testing.assert_close(teacher, F.avg_pool2d(large, 2))
    student, teacher = match_spatial(large, small)
    torch.testing.assert_close(student, F.avg_pool2d(large, 2))
    assert teacher is small
    assert match_spatial(small, small) == (small, small)
    assert describe_spatial_match(small.shape, large.shape) == (
        "the teacher's 8×8 feature map is average-pooled to 4×4 before the DiffKD head")
    assert describe_spatial_match((2, 8, 7, 7), (2, 16, 3, 3)) == (
        "the student's 7×7 feature map (not a multiple: neighbouring pooling windows overlap) is average-pooled "
        "to 3×3 before the DiffKD head")
    assert describe_spatial_match((2, 8, 8, 4), (2, 8, 4, 8)) == (
        "the student's 8×4 feature map and the teacher's 4×8 feature map are average-pooled to 4×4 before the "
        "DiffKD head")
    assert describe_spatial_match(small.shape, small.shape) is None
    with pytest.raises(ValueError, match=r"the teacher feature must be a B×C×H×W map, got shape \(2, 100\)"):
        match_spatial(small, torch.randn(2, 100))
