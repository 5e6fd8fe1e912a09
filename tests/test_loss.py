"""DiffKDLoss: named pairs of maps, sequences and vectors, their terms and weights, size matching, models' dry
forwards, the optimizer's parameters, graphing and checkpoints, and the errors for inputs that do not fit."""
import warnings

import pytest
import torch
from torch import nn

from diffkd import CUDAGraphHead, DiffKDHead, DiffKDLoss, FeatureTaps
from diffkd.methods import FeatureRegression

TERMS = ("kd_loss", "diffusion_loss", "ae_loss", "gamma", "gamma_std", "rel_error_before", "rel_error_after")
SMALL = dict(inference_steps=2)


def _feats(batch=4):
    student = {"layer4": torch.randn(batch, 8, 4, 4), "logits": torch.randn(batch, 10)}
    teacher = {"layer4": torch.randn(batch, 16, 4, 4), "logits": torch.randn(batch, 10)}
    return student, teacher


def _loss(**options):
    return DiffKDLoss({"layer4": (8, 16), "logits": (10, 10)}, vectors=("logits",),
                      **{"graph": False, **SMALL, **options})


def test_every_pair_gets_its_terms_and_the_loss_is_the_weighted_sum():
    loss_fn = _loss(weights={"layer4": 0.5})
    out = loss_fn(*_feats())
    assert set(out) == {"loss"} | {f"{name}/{term}" for name in ("layer4", "logits") for term in TERMS}
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    terms = {key: value for key, value in out.items() if key != "loss"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad for v in terms.values())
    # Each head's loss is kd + diffusion + ae (weights 1); the pair weight scales its head's loss.
    expected = sum(weight * sum(out[f"{name}/{term}"] for term in ("kd_loss", "diffusion_loss", "ae_loss"))
                   for name, weight in (("layer4", 0.5), ("logits", 1.0)))
    torch.testing.assert_close(out["loss"].detach(), expected)
    task_loss = torch.tensor(3.0, requires_grad=True)
    torch.manual_seed(0)
    plain = loss_fn(*_feats())["loss"]
    torch.manual_seed(0)
    with_task = loss_fn(*_feats(), task_loss=task_loss)["loss"]
    torch.testing.assert_close(with_task, task_loss + plain)


def test_vector_pairs_get_the_papers_logit_head_and_options_reach_their_heads():
    loss_fn = _loss(use_anm=False, head_options={"layer4": dict(use_ae=True, ae_channels=8)})
    maps, logits = loss_fn.heads["layer4"], loss_fn.heads["logits"]
    assert (logits.kernel_size, logits.distance, logits.temperature, logits.use_ae) == (1, "kl", 1.0, False)
    assert (maps.kernel_size, maps.distance, maps.use_ae, maps.width) == (3, "mse", True, 8)
    assert not maps.use_anm and not logits.use_anm and maps.inference_steps == 2
    own = _loss(head_options={"logits": dict(distance="dist", temperature=4.0)}).heads["logits"]
    assert (own.distance, own.temperature, own.kernel_size) == ("dist", 4.0, 1)


def test_parameters_are_exactly_the_heads_and_all_train():
    loss_fn = _loss()
    heads = [p for head in loss_fn.head_modules().values() for p in head.parameters()]
    assert [id(p) for p in loss_fn.parameters()] == [id(p) for p in heads]
    assert loss_fn.trainable_parameters() == list(loss_fn.parameters())
    assert loss_fn.extra_parameter_count() == sum(p.numel() for p in heads)
    out = loss_fn(*_feats())
    out["loss"].backward()
    assert all(p.grad is not None for p in loss_fn.parameters())


def test_larger_maps_are_pooled_to_the_smaller_once_said():
    loss_fn = DiffKDLoss({"x": (8, 16)}, graph=False, **SMALL)
    student, teacher = torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)
    with pytest.warns(UserWarning, match=r"pair 'x': the student's 8×8 feature map is average-pooled to 4×4"):
        loss_fn({"x": student}, {"x": teacher})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        out = loss_fn({"x": student}, {"x": teacher})
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("student_length, teacher_length", [(16, 16), (17, 17), (17, 23)])
def test_token_sequences_of_any_length_use_a_one_dimensional_denoiser(student_length, teacher_length):
    """A language model's hidden states: B×N×C with any N (square or not), lengths pooled like maps."""
    loss_fn = DiffKDLoss({"hidden": (12, 16)}, graph=False, **SMALL)
    student = torch.randn(3, student_length, 12, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loss_fn({"hidden": student}, {"hidden": torch.randn(3, teacher_length, 16)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and student.grad.abs().sum() > 0
    # The head runs the sequence as a B×C×N×1 map: each position's 1-D neighbourhood is all the 3×3 convolution sees.
    head = loss_fn.heads["hidden"].eval()
    tokens = torch.randn(2, 17, 12)
    as_map = tokens.transpose(1, 2)[..., None]
    with torch.no_grad():
        from_tokens = head(tokens, torch.randn(2, 17, 16), diffusion_t=torch.zeros(2, dtype=torch.long))
    assert from_tokens["denoised"].shape == (2, 17, 16)
    torch.testing.assert_close(head._to_map(tokens, "student"), as_map)


def test_a_head_on_sequences_sees_only_neighbouring_tokens():
    """Changing token 0 changes the denoised output near it and not at the far end (1-D receptive field)."""
    head = DiffKDHead(8, 8, inference_steps=1, use_anm=False, backend="torch").eval()
    tokens, teacher = torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    changed = tokens.clone()
    changed[:, 0] += 5
    with torch.no_grad():
        a = head(tokens, teacher, diffusion_t=torch.zeros(2, dtype=torch.long))["denoised"]
        b = head(changed, teacher, diffusion_t=torch.zeros(2, dtype=torch.long))["denoised"]
    difference = (a - b).abs().amax(dim=(0, 2))
    assert difference[0] > 0 and torch.all(difference[20:] == 0)


class _Net(nn.Module):
    """A tiny classifier: a 4×4 map (block) and logits (fc)."""

    def __init__(self, width, classes=10):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.block(x).mean(dim=(2, 3)))


def test_from_models_measures_channels_and_layouts_with_one_dry_forward():
    student, teacher = _Net(8), _Net(16)
    student.train()
    loss_fn = DiffKDLoss.from_models(student, teacher, {"block": ("block", "block"), "logits": (None, None)},
                                     torch.randn(1, 3, 8, 8), graph=False, **SMALL)
    assert student.training and not any(m._forward_hooks for m in student.modules())  # flags and hooks restored
    assert (loss_fn.heads["block"].student_channels, loss_fn.heads["block"].teacher_channels) == (8, 16)
    assert loss_fn.heads["logits"].kernel_size == 1 and loss_fn.layouts == {"block": "map", "logits": "vector"}
    images = torch.randn(4, 3, 8, 8)
    with FeatureTaps(student, ["block"]) as student_taps, FeatureTaps(teacher, ["block"]) as teacher_taps:
        logits = student(images)
        with torch.no_grad():
            teacher_logits = teacher(images)
        out = loss_fn(loss_fn.pair_inputs("student", student_taps.features(), logits),
                      loss_fn.pair_inputs("teacher", teacher_taps.features(), teacher_logits))
    assert {"block/kd_loss", "logits/kd_loss"} <= set(out)
    out["loss"].backward()
    assert student.fc.weight.grad is not None


def test_feature_taps_give_named_features_in_the_loss_layout():
    model = _Net(8)
    with FeatureTaps(model, ["block", "fc"]) as taps:
        logits = model(torch.randn(2, 3, 8, 8))
        feats = taps.features()
    assert list(feats) == ["block", "fc"] and feats["block"].shape == (2, 8, 4, 4) and feats["fc"] is logits
    assert not any(m._forward_hooks for m in model.modules())


def test_a_few_steps_on_fixed_random_features_decrease_the_loss():
    torch.manual_seed(0)
    loss_fn = DiffKDLoss({"map": (8, 8), "seq": (8, 8), "logits": (5, 5)}, vectors=["logits"], graph=False,
                         inference_steps=1)
    student = {"map": torch.randn(8, 8, 3, 3), "seq": torch.randn(8, 7, 8), "logits": torch.randn(8, 5)}
    teacher = {"map": torch.randn(8, 8, 3, 3), "seq": torch.randn(8, 7, 8), "logits": torch.randn(8, 5)}
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def evaluate():  # fixed noise: the same draw before and after training
        generator.manual_seed(0)
        return sum(head(student[name], teacher[name], generator=generator)["loss"]
                   for name, head in loss_fn.head_modules().items()).item()

    before = evaluate()
    for _ in range(30):
        out = loss_fn(student, teacher)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert evaluate() < 0.7 * before


def test_state_dict_round_trips_and_keys_are_the_heads():
    source, target = _loss(), _loss()
    state = source.state_dict()
    assert state and all(key.startswith(("heads.layer4.", "heads.logits.")) for key in state)
    target.load_state_dict(state)
    assert all(torch.equal(state[key], value) for key, value in target.state_dict().items())


def test_graph_false_keeps_bare_heads_and_auto_on_cpu_runs_them_eagerly():
    assert all(isinstance(h, DiffKDHead) for h in _loss(graph=False).head_modules().values())
    auto = _loss(graph="auto")
    wrapped = torch.cuda.is_available()
    assert all(isinstance(h, CUDAGraphHead) == wrapped for h in auto.head_modules().values())
    forced = _loss(graph=True)
    assert all(isinstance(h, CUDAGraphHead) for h in forced.head_modules().values())
    assert set(forced.state_dict()) == set(_loss(graph=False).state_dict())  # the wrapper is transparent
    out = forced(*_feats())  # CPU tensors: every wrapped head passes through to its eager forward
    out["loss"].backward()
    assert all(h.last_path == "eager torch" for h in forced.head_modules().values())


def test_prebuilt_heads_can_be_shared_by_pairs():
    loss_fn = DiffKDLoss.from_heads({"shared": FeatureRegression(8, 8)}, head_of={"a": "shared", "b": "shared"},
                                    weights={"b": 2.0})
    x, y = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    out = loss_fn({"a": x, "b": x}, {"a": y, "b": y})
    torch.testing.assert_close(out["loss"].detach(), 3 * out["a/kd_loss"])
    assert list(loss_fn.head_modules()) == ["shared"]


@pytest.mark.parametrize("build, message", [
    (lambda: DiffKDLoss({}), "at least one pair"),
    (lambda: DiffKDLoss({"x": (8,)}), r"pair 'x': expected \(student_channels, teacher_channels\)"),
    (lambda: DiffKDLoss({"x": (8, 8)}, vectors=("y",)), r"vectors names \['y'\]"),
    (lambda: DiffKDLoss({"x": (8, 8)}, weights={"x": -1}), r"weights\['x'\] must be a number >= 0"),
    (lambda: DiffKDLoss({"x": (8, 8)}, head_options={"y": {}}), r"head_options names \['y'\]"),
    (lambda: DiffKDLoss({"x": (8, 8)}, kernel_size=1), "kernel_size follows each pair's layout"),
    (lambda: DiffKDLoss({"x": (8, 8)}, graph="yes"), "graph must be 'auto', True or False"),
    (lambda: DiffKDLoss({"x": (8, 8)}, nfe=3), r"pair 'x': .*unexpected keyword argument 'nfe'"),
    (lambda: DiffKDLoss({"x/y": (8, 8)}), "without '/'"),
])
def test_bad_construction_is_refused_with_the_problem_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("student, teacher, message", [
    ({"layer4": torch.randn(4, 8, 4, 4)}, None, r"student_feats must hold exactly the pairs .*missing \['logits'\]"),
    ({**_feats()[0], "extra": torch.randn(4, 3)}, None, r"unknown \['extra'\]"),
    ({"layer4": torch.randn(4, 7, 4, 4), "logits": torch.randn(4, 10)}, None,
     "student feature has 7 channels .* student_channels=8"),
    ({"layer4": torch.randn(4, 8), "logits": torch.randn(4, 10)}, None,
     r"pair 'layer4' was built for B×C×H×W maps or B×N×C sequences, got student shape \(4, 8\)"),
    ({"layer4": torch.randn(4, 8, 4, 4), "logits": torch.randn(4, 10, 2, 2)}, None,
     "pair 'logits' was built for B×K vectors.*drop it from vectors="),
    ({"layer4": [1, 2], "logits": torch.randn(4, 10)}, None, "the student feature is a list, not a tensor"),
])
def test_inputs_that_do_not_fit_are_refused_with_the_pair_named(student, teacher, message):
    loss_fn = _loss()
    with pytest.raises(ValueError, match=message):
        loss_fn(student, teacher if teacher is not None else _feats()[1])
