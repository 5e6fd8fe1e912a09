"""DiffKD as a timm training task: DiffKDTask drives the loop the way timm's train.py drives its tasks.

timm's resnet34 teaches resnet18 (random weights unless --teacher-checkpoint names a state_dict of a trained
10-class, 1-channel resnet34 for Fashion-MNIST, or 3-channel with --data random).  The loop is timm's: the
optimizer over task.get_trainable_module() (the student and the DiffKD heads), task(input, target) returning
timm's dict, and the EMA kept by the task.

    python examples/timm_task.py --steps 200 --ema
    python examples/timm_task.py --steps 2 --data random
"""
from __future__ import annotations

import argparse

import timm
import torch
from timm.optim import create_optimizer_v2

from diffkd.integrations.timm import DiffKDTask
from example_data import NUM_CLASSES, add_data_arguments, batches, image_shape


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: %(default)s)")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--teacher-checkpoint", help="state_dict file of the trained teacher")
    parser.add_argument("--features", nargs="+", default=["layer4"], help="modules to distil besides the logits")
    parser.add_argument("--nfe", type=int, default=5, help="DiffKD denoising steps")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the student and the heads")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels = 1 if args.data == "fashion-mnist" else 3

    student = timm.create_model(args.student, num_classes=NUM_CLASSES, in_chans=channels).to(device)
    teacher = timm.create_model(args.teacher, num_classes=NUM_CLASSES, in_chans=channels)
    if args.teacher_checkpoint:
        teacher.load_state_dict(torch.load(args.teacher_checkpoint, map_location="cpu", weights_only=True))
    else:
        print("note: the teacher has random weights (pass --teacher-checkpoint FILE to distil a trained one)")
    task = DiffKDTask(student, teacher.to(device), criterion=torch.nn.CrossEntropyLoss(), distill_loss_weight=1.0,
                      features=args.features, nfe=args.nfe, input_size=image_shape(args, channels), device=device)
    optimizer = create_optimizer_v2(task.get_trainable_module(), "sgd", lr=args.lr, momentum=0.9, weight_decay=5e-4)
    if args.ema:
        task.setup_ema(decay=0.998)

    task.get_trainable_module().train()
    for step, (images, labels) in enumerate(batches(args, args.steps, channels, device), start=1):
        result = task(images, labels)
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        optimizer.step()
        task.update_ema(step=step)
        terms = "  ".join(f"{key} {value.item():.3f}" for key, value in result.items()
                          if key.endswith(("kd_loss", "diffusion_loss")))
        print(f"step {step}/{args.steps}  loss {result['loss'].item():.3f}  task_loss "
              f"{result['task_loss'].item():.3f}  {terms}")
    eval_model = task.get_eval_model(ema=args.ema)
    print(f"the model to evaluate and deploy: {type(eval_model).__name__} "
          f"({sum(p.numel() for p in eval_model.parameters()):,} parameters; checkpoint keys "
          f"{sorted(task.get_checkpoint_state())})")


if __name__ == "__main__":
    main()
