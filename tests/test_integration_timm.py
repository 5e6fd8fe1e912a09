"""diffkd.integrations.timm.DiffKDTask: timm's task contract with random-weight timm models on tiny inputs."""
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
timm_task = pytest.importorskip("timm.task")

from diffkd.integrations.timm import DiffKDTask, resolve_loss_weights  # noqa: E402

SIZE = (3, 32, 32)
NUM_CLASSES = 10


def resnets():
    return (timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES),
            timm.create_model("resnet34", pretrained=False, num_classes=NUM_CLASSES))


def tiny_vit(embed_dim):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=32,
                             patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2)


def batch(size=4):
    return torch.randn(size, *SIZE), torch.randint(0, NUM_CLASSES, (size,))


def train_steps(task, images, labels, steps, lr=0.05):
    """Losses of ``steps`` SGD steps on one batch; the heads' noise is re-seeded so every step sees the same draw
    and the loss is a function of the parameters alone."""
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        result = task(images, labels)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        losses.append(result["loss"].item())
    return losses, result


def run_once(task, images, labels):
    torch.manual_seed(0)
    return task(images, labels)


@pytest.fixture(scope="module")
def resnet_task():
    torch.manual_seed(0)
    student, teacher = resnets()
    return DiffKDTask(student, teacher, criterion=nn.CrossEntropyLoss(), features=["layer4"], input_size=SIZE,
                      distill_loss_weight=1.0, verbose=False)


def test_resnet34_to_resnet18_trains_and_returns_timms_dict(resnet_task):
    images, labels = batch()
    losses, result = train_steps(resnet_task, images, labels, steps=4)
    assert losses[-1] < losses[0], losses
    for key in ("loss", "output", "task_loss", "kd_loss", "layer4/kd_loss", "layer4/diffusion_loss",
                "layer4/gamma", "logits/kd_loss", "logits/diffusion_loss"):
        assert key in result, sorted(result)
    assert result["output"].shape == (4, NUM_CLASSES)
    torch.testing.assert_close(result["loss"], result["task_loss"] + result["kd_loss"])
    # the trainable module holds exactly the student and the heads: what timm's optimizer factory sees
    trainable = set(map(id, resnet_task.get_trainable_module().parameters()))
    expected = {id(p) for p in resnet_task.get_eval_model().parameters()} | set(map(id, resnet_task.diffkd.parameters()))
    assert trainable == expected
    assert not any(p.requires_grad for p in resnet_task.teacher.parameters())
    assert not resnet_task.teacher.model.training


def test_vit_pair_distils_tokens_from_default_taps():
    student, teacher = tiny_vit(32), tiny_vit(64)
    task = DiffKDTask(student, teacher, task_loss_weight=0.5, input_size=SIZE, verbose=False)
    assert task.diffkd.taps == {"feature": ("norm", "norm"), "logits": (None, None)}
    assert (task.task_loss_weight, task.distill_loss_weight) == (0.5, 0.5)
    losses, result = train_steps(task, *batch(), steps=3)
    assert losses[-1] < losses[0], losses
    assert torch.isfinite(result["feature/kd_loss"])


def test_state_dict_and_checkpoint_round_trip(resnet_task, tmp_path):
    images, labels = batch()
    expected = run_once(resnet_task, images, labels)

    torch.manual_seed(1)
    student, teacher = resnets()
    copy = DiffKDTask(student, teacher, features=["layer4"], input_size=SIZE, distill_loss_weight=1.0, verbose=False)
    copy.load_state_dict(resnet_task.state_dict())
    torch.testing.assert_close(run_once(copy, images, labels)["loss"], expected["loss"])

    # timm's checkpoint path: the student under state_dict, the heads under task_state
    state = resnet_task.get_checkpoint_state()
    assert set(state) == {"state_dict", "task_state"} and "diffkd" in state["task_state"]
    torch.save(state, tmp_path / "checkpoint.pth")
    torch.manual_seed(2)
    student, _ = resnets()
    resumed = DiffKDTask(student, resnet_task.teacher, features=["layer4"], input_size=SIZE,
                         distill_loss_weight=1.0, verbose=False)
    timm_task.resume_task_checkpoint(resumed, str(tmp_path / "checkpoint.pth"), log_info=False)
    torch.testing.assert_close(run_once(resumed, images, labels)["loss"], expected["loss"])
    with pytest.raises(RuntimeError, match="another task"):
        resumed.load_task_state({"projection": {}})


def test_ema_tracks_student_and_heads(resnet_task):
    task = DiffKDTask(*resnets(), features=["layer4"], input_size=SIZE, verbose=False)
    task.setup_ema(decay=0.5)
    ema_student = task.get_eval_model(ema=True)
    assert ema_student is not task.get_eval_model()
    assert type(ema_student) is type(task.get_eval_model())
    before = {k: v.clone() for k, v in task.get_task_state(ema=True)["diffkd"].items()}
    train_steps(task, *batch(), steps=1)
    task.update_ema(step=1)
    after = task.get_task_state(ema=True)["diffkd"]
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


def test_prepare_distributed_wraps_student_and_heads_only():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        task = DiffKDTask(*resnets(), features=["layer4"], input_size=SIZE, verbose=False)
        task.prepare_distributed()
        assert isinstance(task.get_trainable_module(), nn.parallel.DistributedDataParallel)
        assert not isinstance(task.teacher, nn.parallel.DistributedDataParallel)
        losses, _ = train_steps(task, *batch(), steps=2)
        with task.no_sync():
            run_once(task, *batch())["loss"].backward()
        assert task.get_eval_model() is task.get_trainable_module().module.student
        assert "diffkd" in task.get_task_state()
    finally:
        dist.destroy_process_group()


def test_teacher_input_is_renormalised_like_timms_tasks():
    student = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)  # ImageNet mean / std
    teacher = tiny_vit(32)                                                              # mean = std = 0.5
    task = DiffKDTask(student, teacher, features={}, input_size=SIZE, verbose=False)
    seen = []
    handle = teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, labels = batch()
    run_once(task, images, labels)
    handle.remove()
    mean, std = (torch.tensor(student.pretrained_cfg[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    torch.testing.assert_close(seen[0], (images * std + mean - 0.5) / 0.5)


def test_loss_weights_follow_timms_rule():
    assert resolve_loss_weights(None, None) == (1.0, 1.0)
    assert resolve_loss_weights(2.0, None) == (1.0, 2.0)
    assert resolve_loss_weights(None, 0.3) == (0.3, 0.7)
    assert resolve_loss_weights(5.0, 0.5) == (0.5, 5.0)


def test_bad_settings_fail_clearly():
    student, teacher = resnets()
    with pytest.raises(ValueError, match="nothing to distil"):
        DiffKDTask(student, teacher, features=[], logit_head=False, input_size=SIZE, verbose=False)
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        DiffKDTask(student, teacher, features=["layer9"], input_size=SIZE, verbose=False)
    with pytest.raises(ValueError, match="ae_channels"):
        DiffKDTask(student, teacher, features=["layer4"], ae_channels=-1, input_size=SIZE, verbose=False)


def test_zoo_models_without_pretrained_config_hand_the_input_over_unchanged():
    from diffkd.models import create_model
    student, teacher = create_model("resnet8x4", num_classes=NUM_CLASSES), create_model("resnet32x4",
                                                                                       num_classes=NUM_CLASSES)
    task = DiffKDTask(student, teacher, verbose=False)   # input size and taps found by the zoo's rules
    assert task.diffkd.taps == {"feature": ("layer3", "layer3"), "logits": (None, None)}
    seen = []
    handle = teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, labels = batch(2)
    result = run_once(task, images, labels)
    handle.remove()
    assert seen[0] is images or torch.equal(seen[0], images)
    assert torch.isfinite(result["loss"])


def test_compile_compiles_the_eval_student_and_checkpoints_stay_unwrapped(resnet_task):
    plain_keys = set(resnet_task.get_checkpoint_state()["state_dict"])
    compiled = resnet_task.compile(backend="eager")
    try:
        assert resnet_task.get_eval_model() is compiled
        assert set(resnet_task.get_checkpoint_state()["state_dict"]) == plain_keys
    finally:
        del resnet_task.eval_model   # the module-scoped task goes back to its plain eval model
