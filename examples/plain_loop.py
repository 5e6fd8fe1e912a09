"""DiffKD in a training loop of your own: torchvision's ResNet-34 teaches ResNet-18 through DiffKDLoss.

Two feature maps (layer3, layer4) and the logits are distilled; the heads' parameters join the student's in the
optimizer.  The teacher has random weights unless --teacher-weights names a state_dict file of a trained ResNet-34
with 10 classes (random weights make this a smoke run of the mechanics, not a distillation).

    python examples/plain_loop.py --steps 200               # Fashion-MNIST
    python examples/plain_loop.py --steps 2 --data random   # no data needed
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from diffkd import DiffKDLoss, FeatureTaps
from example_data import NUM_CLASSES, add_data_arguments, batches, image_shape

FEATURES = ["layer3", "layer4"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--teacher-weights", help="state_dict file of a trained 10-class torchvision ResNet-34")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    teacher = torchvision.models.resnet34(num_classes=NUM_CLASSES)
    if args.teacher_weights:
        teacher.load_state_dict(torch.load(args.teacher_weights, map_location="cpu", weights_only=True))
    else:
        print("note: the teacher has random weights (pass --teacher-weights FILE to distil a trained one)")
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = torchvision.models.resnet18(num_classes=NUM_CLASSES).to(device)

    # One dry forward measures every pair's channels; None is the model's output (the logit head).
    pairs = {name: (name, name) for name in FEATURES} | {"logits": (None, None)}
    sample = torch.zeros(1, *image_shape(args, channels=3), device=device)
    loss_fn = DiffKDLoss.from_models(student, teacher, pairs, sample).to(device)
    print(f"DiffKD heads: {loss_fn.extra_parameter_count():,} training-only parameters")
    optimizer = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=args.lr, momentum=0.9,
                                weight_decay=5e-4)

    student.train()
    for step, (images, labels) in enumerate(batches(args, args.steps, channels=3, device=device), start=1):
        with torch.no_grad(), FeatureTaps(teacher, FEATURES) as taps:
            teacher_logits = teacher(images)
            teacher_feats = loss_fn.pair_inputs("teacher", taps.features(), teacher_logits)
        with FeatureTaps(student, FEATURES) as taps:
            logits = student(images)
            student_feats = loss_fn.pair_inputs("student", taps.features(), logits)
        out = loss_fn(student_feats, teacher_feats, task_loss=F.cross_entropy(logits, labels))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        terms = "  ".join(f"{key} {out[key].item():.3f}" for key in ("layer4/kd_loss", "layer4/diffusion_loss",
                                                                      "logits/kd_loss", "logits/gamma"))
        print(f"step {step}/{args.steps}  loss {out['loss'].item():.3f}  {terms}")


if __name__ == "__main__":
    main()
