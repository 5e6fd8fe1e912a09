"""DiffKD in torchdistill: the shipped config (resnet32x4 -> resnet8x4 on CIFAR-100) run for a few steps.

The config names DiffKD's registered parts (the DiffKDStudent wrapper, the DiffKDLoss loss, the diffkd_model
factory); torchdistill builds its DistillationBox from it and this script runs the box's training steps.  For a
full run use torchdistill's own examples/torchvision/image_classification.py with the same config.

Without --cifar-root the images are random (torchvision's FakeData in the place of CIFAR-100), so nothing is
downloaded; without the teacher file the config names, the teacher has random weights.

    python examples/torchdistill_cifar100.py --steps 2
    python examples/torchdistill_cifar100.py --steps 500 --cifar-root ~/datasets/cifar100 --teacher-ckpt FILE
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies
from torchdistill.core.distillation import get_distillation_box
from torchdistill.models.registry import get_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "torchdistill" / "resnet8x4_from_resnet32x4.yaml"


def load_config(path: Path, cifar_root: str | None, samples: int) -> dict:
    """The config, its datasets built as it says but from ``cifar_root``, or, without it, FakeData of ``samples``
    random images (torchdistill builds the datasets while it reads the file, so the substitution wraps the read)."""
    real_cifar100 = torchvision.datasets.CIFAR100

    def cifar100(root, train=True, download=False, transform=None):
        if cifar_root is not None:
            return real_cifar100(os.path.expanduser(cifar_root), train=train, download=download, transform=transform)
        return torchvision.datasets.FakeData(size=samples, image_size=(3, 32, 32), num_classes=100,
                                             transform=transform, random_offset=0 if train else samples)

    with mock.patch.object(torchvision.datasets, "CIFAR100", cifar100):
        return yaml_util.load_yaml_file(str(path))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--cifar-root", help="folder for torchvision's CIFAR100 (random images without it)")
    parser.add_argument("--teacher-ckpt", help="the teacher file (default: the config's, if it exists)")
    parser.add_argument("--batch-size", type=int, help="override the config's training batch size")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    batch_size = args.batch_size or 64
    config = load_config(args.config, args.cifar_root, samples=args.steps * batch_size)
    import_dependencies(config.get("dependencies"))   # registers DiffKD's parts in torchdistill
    train_config = config["train"]
    for loader in ("train_data_loader", "val_data_loader"):
        train_config[loader]["kwargs"].update(batch_size=batch_size, num_workers=0 if args.cifar_root is None else 4,
                                              pin_memory=device.type == "cuda")

    models = config["models"]
    teacher_kwargs = models["teacher_model"]["kwargs"]
    teacher_kwargs["checkpoint"] = args.teacher_ckpt or teacher_kwargs.get("checkpoint")
    if not (teacher_kwargs["checkpoint"] and os.path.isfile(teacher_kwargs["checkpoint"])):
        print(f"note: no teacher file at {teacher_kwargs['checkpoint']}; the teacher has random weights")
        teacher_kwargs["checkpoint"] = None
    teacher, student = (get_model(models[role]["key"], **models[role]["kwargs"]).to(device)
                        for role in ("teacher_model", "student_model"))
    box = get_distillation_box(teacher, student, config["datasets"], train_config, device, device_ids=None,
                               distributed=False, lr_factor=1)
    diffkd_loss = box.criterion.term_dict["diffkd"][0]

    box.pre_epoch_process(epoch=0)
    for step, (images, targets, supp_dict) in enumerate(box.train_data_loader, start=1):
        loss = box.forward_process(images.to(device), targets.to(device), supp_dict)
        box.post_forward_process(loss=loss)
        terms = "  ".join(f"{key} {value.item():.3f}" for key, value in diffkd_loss.last_terms.items()
                          if key.endswith(("kd_loss", "diffusion_loss")))
        print(f"step {step}/{args.steps}  loss {loss.item():.3f}  {terms}")
        if step == args.steps:
            break
    box.clean_modules()


if __name__ == "__main__":
    main()
