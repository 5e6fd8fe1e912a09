"""diffkd.integrations.torchdistill: the shipped config builds torchdistill's DistillationBox and trains on random
CIFAR-shaped data (torchvision's FakeData in the place of CIFAR-100; a random teacher)."""
from pathlib import Path

import pytest
import torch

torchdistill = pytest.importorskip("torchdistill", reason="torchdistill is not installed (pip install -e '.[integrations]')")

from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.common.main_util import import_dependencies  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.models.registry import get_model  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "torchdistill" / "resnet8x4_from_resnet32x4.yaml"
BATCH = 4


def fake_cifar100(root, train=True, download=False, transform=None):
    """torchvision's FakeData shaped like CIFAR-100: random 32×32 RGB images, 100 classes."""
    import torchvision
    return torchvision.datasets.FakeData(size=2 * BATCH, image_size=(3, 32, 32), num_classes=100,
                                         transform=transform, random_offset=0 if train else 1)


def load_config(monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    config = yaml_util.load_yaml_file(str(CONFIG))
    import_dependencies(config.get("dependencies"))
    train = config["train"]
    for loader in ("train_data_loader", "val_data_loader"):
        train[loader]["kwargs"].update(batch_size=BATCH, num_workers=0, pin_memory=False)
    return config


def build_box(config):
    models = config["models"]
    models["teacher_model"]["kwargs"].pop("checkpoint")   # no benchmark teacher file here: a random teacher
    teacher, student = (get_model(models[role]["key"], **models[role]["kwargs"])
                        for role in ("teacher_model", "student_model"))
    box = get_distillation_box(teacher, student, config["datasets"], config["train"], torch.device("cpu"),
                               device_ids=None, distributed=False, lr_factor=1)
    return box, student


def test_config_builds_the_distillation_box_and_trains(monkeypatch):
    config = load_config(monkeypatch)
    box, student = build_box(config)
    wrapper = box.student_model
    assert type(wrapper).__name__ == "DiffKDStudent" and wrapper.student_model is student
    optimized = {id(p) for group in box.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in wrapper.diffkd.parameters()} <= optimized, "the heads must be trained"
    assert {id(p) for p in student.parameters()} <= optimized

    diffkd_loss = box.criterion.term_dict["diffkd"][0]
    box.pre_epoch_process(epoch=0)
    head_weights = [p.detach().clone() for p in wrapper.diffkd.parameters()]
    losses = []
    for step, (images, targets, supp_dict) in enumerate(box.train_data_loader):
        loss = box.forward_process(images, targets, supp_dict)
        box.post_forward_process(loss=loss)
        losses.append(loss.item())
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert {"layer3/kd_loss", "layer3/diffusion_loss", "logits/kd_loss", "logits/gamma"} <= set(diffkd_loss.last_terms)
    assert any(not torch.equal(before, after.detach())
               for before, after in zip(head_weights, wrapper.diffkd.parameters())), "the heads did not move"


def test_loss_without_the_wrapper_says_what_is_missing(monkeypatch):
    config = load_config(monkeypatch)
    del config["train"]["student"]["auxiliary_model_wrapper"]
    config["train"]["student"]["forward_hook"]["output"] = ["layer3"]
    box, _ = build_box(config)
    images, targets, supp_dict = next(iter(box.train_data_loader))
    with pytest.raises(ValueError, match="auxiliary_model_wrapper"):
        box.forward_process(images, targets, supp_dict)


def test_missing_hook_names_the_fix(monkeypatch):
    config = load_config(monkeypatch)
    config["train"]["teacher"]["forward_hook"]["output"] = []
    box, _ = build_box(config)
    images, targets, supp_dict = next(iter(box.train_data_loader))
    with pytest.raises(ValueError, match="forward_hook"):
        box.forward_process(images, targets, supp_dict)
