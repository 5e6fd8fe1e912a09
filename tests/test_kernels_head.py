"""A whole DiffKDHead on the Triton kernels (interpreter) against the same head on the PyTorch reference."""
import pytest
import torch

from diffkd import DiffKDHead
from kernel_utils import make, poisoned_outputs  # noqa: F401

LOSSES = ("loss", "kd_loss", "diffusion_loss", "ae_loss")


def _twin_heads(**kwargs):
    reference_head = DiffKDHead(6, 16, backend="torch", **kwargs)
    triton_head = DiffKDHead(6, 16, backend="triton", **kwargs)
    triton_head.load_state_dict(reference_head.state_dict())
    return reference_head, triton_head


def _run(head, student, teacher, noises):
    outputs = head(student, teacher, **noises)
    named = [(name, p) for name, p in head.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(outputs["loss"], [p for _, p in named], allow_unused=True)
    return outputs, {name: grad for (name, _), grad in zip(named, grads)}


@pytest.mark.parametrize("kernel_size, use_ae, student_shape", [(3, False, (2, 6, 3, 3)), (3, True, (2, 6, 3, 3)),
                                                                 (1, False, (3, 6))],
                         ids=["spatial", "spatial+ae", "vector"])
def test_triton_head_matches_torch_head(kernel_size, use_ae, student_shape):
    reference_head, triton_head = _twin_heads(kernel_size=kernel_size, use_ae=use_ae)
    student = make(student_shape, "channels_last" if len(student_shape) == 4 else "contiguous")
    teacher = make((student_shape[0], 16, *student_shape[2:]))
    # The noises are shaped like the head's working maps: vectors are B×K×1×1 maps inside the head.
    map_shape = (student_shape[0], reference_head.width, *(student_shape[2:] or (1, 1)))
    noises = {"blend_noise": make(map_shape), "diffusion_noise": make(map_shape),
              "diffusion_t": torch.randint(0, 1000, (student_shape[0],))}
    expected, expected_grads = _run(reference_head, student, teacher, noises)
    got, got_grads = _run(triton_head, student, teacher, noises)
    for key in LOSSES + ("gamma", "denoised"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert (got_grads[name] is None) == (grad is None), name
        if grad is not None:
            scale = grad.abs().max().item()
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


def test_triton_head_with_in_kernel_noise_is_reproducible():
    """Without explicit noises the Triton head draws seeds from the generator and makes the noise in-kernel."""
    head = DiffKDHead(6, 16, backend="triton")
    student, teacher = make((2, 6, 3, 3)), make((2, 16, 3, 3))
    runs = [head(student, teacher, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert all(torch.isfinite(run["loss"]) for run in runs)
    assert torch.equal(runs[0]["loss"], runs[1]["loss"])
    assert not torch.equal(runs[0]["loss"], runs[2]["loss"])
    grads = torch.autograd.grad(runs[0]["loss"], [p for p in head.parameters()], allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
