"""The reference DiffKD head (backend "torch") against the method's definition, losses and parameter counts."""
import pytest
import torch
import torch.nn.functional as F

from diffkd import DDIMSchedule, DiffKDHead, load_official_state_dict


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- parameter counts of the published heads --------------------------------------------------------------------------------
def test_resnet34_resnet18_feature_head_counts():
    head = DiffKDHead(512, 512, use_ae=True, ae_channels=1024)
    assert n_params(head) == 7_644_418
    assert [n_params(m) for m in (head.trans, head.model, head.noise_adapter, head.proj, head.ae)] == [
        525_312, 4_599_808, 415_490, 1_051_648, 1_052_160]
    assert head.model.time_embedding.weight.numel() == 1_310_720


def test_resnet50_mobilenet_feature_head_count():
    head = DiffKDHead(1024, 2048, use_ae=True, ae_channels=1024)
    assert n_params(head) == 11_315_970
    assert n_params(head.trans) == 1_049_600 and n_params(head.ae) == 4_199_424


def test_imagenet_logit_head_counts():
    head = DiffKDHead(1000, 1000, kernel_size=1)
    assert n_params(head) == 23_323_002
    assert [n_params(m) for m in (head.trans, head.model, head.noise_adapter, head.proj)] == [
        1_001_000, 17_308_000, 4_011_002, 1_003_000]
    assert head.model.time_embedding.weight.numel() == 1_280_000


@pytest.mark.parametrize("channels, kernel_size, expected", [
    (256, 3, 694_722), (128, 3, 256_994), (64, 3, 105_906), (100, 1, 352_302)])
def test_cifar_head_counts(channels, kernel_size, expected):
    assert n_params(DiffKDHead(channels, channels, kernel_size=kernel_size)) == expected


def test_default_ae_width_is_half_the_teacher():
    assert DiffKDHead(8, 64, use_ae=True).width == 32


# ---- official checkpoints -------------------------------------------------------------------------------------
SPATIAL_OFFICIAL_KEYS = ["ae.encoder.0.weight", "ae.encoder.1.running_var", "ae.decoder.0.bias", "trans.weight",
                         "model.time_embedding.weight", "model.pred.0.block.0.weight", "model.pred.0.block.1.bias",
                         "model.pred.0.block.3.weight", "model.pred.1.block.4.running_mean",
                         "model.pred.1.block.6.bias", "model.pred.1.block.7.weight", "model.pred.2.weight",
                         "model.pred.3.running_var", "noise_adapter.feat.0.block.3.weight",
                         "noise_adapter.pred.weight", "proj.0.weight", "proj.1.bias"]
VECTOR_OFFICIAL_KEYS = ["trans.bias", "model.time_embedding.weight", "model.pred.0.weight", "model.pred.1.weight",
                        "model.pred.3.weight", "model.pred.4.bias", "model.pred.5.weight", "model.pred.6.running_mean",
                        "model.pred.8.weight", "noise_adapter.feat.0.weight", "noise_adapter.feat.1.bias",
                        "noise_adapter.feat.3.weight", "noise_adapter.feat.4.weight", "noise_adapter.pred.bias",
                        "proj.0.weight", "proj.1.weight"]


def test_official_state_dict_keys():
    spatial = DiffKDHead(8, 16, use_ae=True).state_dict()
    vector = DiffKDHead(10, 10, kernel_size=1).state_dict()
    assert set(SPATIAL_OFFICIAL_KEYS) <= set(spatial)
    assert set(VECTOR_OFFICIAL_KEYS) <= set(vector)
    assert "model.pred.8.running_mean" not in vector  # no BatchNorm after the vector denoiser's last conv


def test_load_official_state_dict_roundtrip_and_prefix():
    source, target = DiffKDHead(8, 16, use_ae=True), DiffKDHead(8, 16, use_ae=True)
    checkpoint = {f"module.{k}": v for k, v in source.state_dict().items()}
    load_official_state_dict(target, checkpoint, prefix="module.")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_load_official_state_dict_refuses_mismatch():
    checkpoint = DiffKDHead(8, 16, use_ae=True).state_dict()
    with pytest.raises(ValueError, match="missing: ae.decoder.0.bias"):
        load_official_state_dict(DiffKDHead(8, 16, use_ae=True), {k: v for k, v in checkpoint.items()
                                                                 if k != "ae.decoder.0.bias"})
    with pytest.raises(ValueError, match=r"shape mismatch: trans.weight: checkpoint \(4, 8, 1, 1\) vs head \(8, 8, 1, 1\)"):
        load_official_state_dict(DiffKDHead(8, 16, use_ae=True), {**checkpoint, "trans.weight": torch.zeros(4, 8, 1, 1)})
    with pytest.raises(ValueError, match="unexpected: ae.decoder.0.bias"):
        load_official_state_dict(DiffKDHead(8, 16), checkpoint)


# ---- the forward against the equations ---------------------------------------------------------------------------
def official_forward(head, student, teacher, blend_noise, diffusion_noise, diffusion_t):
    """The official pipeline written out from the method's equations, with a diffusers-semantics DDIM step."""
    schedule = DDIMSchedule()
    z_s = F.conv2d(student, head.trans.weight, head.trans.bias)
    if head.use_ae:
        latent = head.ae.encoder[1](F.conv2d(teacher, head.ae.encoder[0].weight, head.ae.encoder[0].bias))
        reconstruction = F.conv2d(latent, head.ae.decoder[0].weight, head.ae.decoder[0].bias)
        ae_loss = ((reconstruction - teacher) ** 2).mean()
        z_t = latent.detach()
    else:
        ae_loss, z_t = torch.zeros(()), teacher
    gamma = head.noise_adapter(z_s).view(-1, 1, 1, 1)
    x = gamma * z_s + (1 - gamma) * blend_noise
    num_steps = 2 * head.inference_steps
    for t in schedule.inference_timesteps(num_steps)[head.inference_steps:]:
        eps = head.model.pred(x + head.model.time_embedding.weight[t][:, None, None])
        x = schedule.step(eps, t, x, num_steps, use_clipped_model_output=True)
    denoised = head.proj[1](F.conv2d(x, head.proj[0].weight, head.proj[0].bias))
    alpha_bar = schedule.alphas_cumprod[diffusion_t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * z_t + (1 - alpha_bar).sqrt() * diffusion_noise
    eps_hat = head.model.pred(noisy + head.model.time_embedding(diffusion_t)[..., None, None])
    diffusion_loss = ((eps_hat - diffusion_noise) ** 2).mean()
    kd_loss = ((denoised - z_t) ** 2).mean()
    return {"kd_loss": kd_loss, "diffusion_loss": diffusion_loss, "ae_loss": ae_loss, "denoised": denoised,
            "gamma": gamma.flatten()}


def _clone_bn_state(head):
    return {k: v.clone() for k, v in head.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("use_ae, kernel_size, nfe", [(False, 3, 5), (True, 3, 3), (False, 1, 5), (False, 3, 1)])
def test_explicit_noises_give_the_losses_of_the_equations(use_ae, kernel_size, nfe):
    torch.manual_seed(0)
    head = DiffKDHead(6, 16, use_ae=use_ae, kernel_size=kernel_size, inference_steps=nfe, backend="torch")
    size = 4 if kernel_size == 3 else 1
    student, teacher = torch.randn(3, 6, size, size), torch.randn(3, 16, size, size)
    width = head.width
    blend_noise, diffusion_noise = torch.randn(3, width, size, size), torch.randn(3, width, size, size)
    diffusion_t = torch.tensor([0, 517, 999])
    bn_state = _clone_bn_state(head)
    ours = head(student, teacher, blend_noise=blend_noise, diffusion_noise=diffusion_noise, diffusion_t=diffusion_t)
    head.load_state_dict(bn_state, strict=False)  # the BatchNorm statistics as they were before our forward
    expected = official_forward(head, student, teacher, blend_noise, diffusion_noise, diffusion_t)
    for key in ("kd_loss", "diffusion_loss", "ae_loss", "denoised", "gamma"):
        torch.testing.assert_close(ours[key], expected[key], rtol=2e-5, atol=2e-6, msg=key)
    torch.testing.assert_close(ours["loss"], expected["kd_loss"] + expected["diffusion_loss"] + expected["ae_loss"])


def test_generator_draws_in_the_official_order():
    head = DiffKDHead(6, 10, backend="torch")
    student, teacher = torch.randn(2, 6, 3, 3), torch.randn(2, 10, 3, 3)
    bn_state = _clone_bn_state(head)
    ours = head(student, teacher, generator=torch.Generator().manual_seed(7))
    head.load_state_dict(bn_state, strict=False)
    generator = torch.Generator().manual_seed(7)
    blend_noise = torch.randn(2, 10, 3, 3, generator=generator)
    diffusion_noise = torch.randn(2, 10, 3, 3, generator=generator)
    diffusion_t = torch.randint(0, 1000, (2,), generator=generator)
    explicit = head(student, teacher, blend_noise=blend_noise, diffusion_noise=diffusion_noise, diffusion_t=diffusion_t)
    for key in ("loss", "kd_loss", "diffusion_loss", "denoised"):
        torch.testing.assert_close(ours[key], explicit[key], rtol=0, atol=0)


def test_same_generator_same_outputs_and_fresh_noise_otherwise():
    head = DiffKDHead(4, 8, backend="torch").eval()
    student, teacher = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    first = head(student, teacher, generator=torch.Generator().manual_seed(1))
    again = head(student, teacher, generator=torch.Generator().manual_seed(1))
    other = head(student, teacher, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first["denoised"], again["denoised"]) and torch.equal(first["loss"], again["loss"])
    assert not torch.equal(first["denoised"], other["denoised"])


def test_without_anm_the_chain_starts_from_the_student():
    head = DiffKDHead(6, 10, use_anm=False, backend="torch")
    assert head.noise_adapter is None
    student, teacher = torch.randn(2, 6, 3, 3), torch.randn(2, 10, 3, 3)
    out = head(student, teacher, diffusion_noise=torch.randn(2, 10, 3, 3), diffusion_t=torch.tensor([3, 4]))
    assert torch.equal(out["gamma"], torch.ones(2))
    head.eval()
    z_s = head.trans(student)
    torch.testing.assert_close(head(student, teacher)["denoised"], head.proj(head.denoise(z_s)))


def test_paper_start_evaluates_500_first():
    head = DiffKDHead(4, 8, timestep_start="paper")
    assert head.chain_timesteps == (500, 400, 300, 200, 100)
    out = head(torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3))
    assert torch.isfinite(out["loss"])


# ---- gradient flow of the official module ------------------------------------------------------------------------------------
def _groups(head):
    return {"ae": head.ae, "trans": head.trans, "phi": head.model.pred, "anm": head.noise_adapter, "proj": head.proj}


def _touched(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("term, expected", [
    ("kd_loss", {"ae": False, "trans": True, "phi": True, "anm": True, "proj": True, "student": True}),
    ("diffusion_loss", {"ae": False, "trans": False, "phi": True, "anm": False, "proj": False, "student": False}),
    ("ae_loss", {"ae": True, "trans": False, "phi": False, "anm": False, "proj": False, "student": False}),
])
def test_gradient_flow_matrix(term, expected):
    head = DiffKDHead(6, 8, use_ae=True, ae_channels=10, backend="torch")
    student = torch.randn(3, 6, 4, 4, requires_grad=True)
    teacher = torch.randn(3, 8, 4, 4)
    diffusion_t = torch.tensor([7, 123, 999])
    out = head(student, teacher, diffusion_t=diffusion_t)
    out[term].backward()
    touched = {name: _touched(module) for name, module in _groups(head).items()}
    touched["student"] = student.grad is not None and student.grad.abs().sum() > 0
    assert touched == expected
    embedding_grad = head.model.time_embedding.weight.grad
    rows = set() if embedding_grad is None else set(embedding_grad.abs().sum(1).nonzero().flatten().tolist())
    expected_rows = {"kd_loss": {400, 300, 200, 100, 0}, "diffusion_loss": {7, 123, 999}, "ae_loss": set()}[term]
    assert rows == expected_rows


def test_every_parameter_gets_a_gradient_from_the_total_loss():
    for head in (DiffKDHead(6, 16, use_ae=True), DiffKDHead(5, 7, kernel_size=1)):
        feats = (torch.randn(4, 6, 3, 3), torch.randn(4, 16, 3, 3)) if head.kernel_size == 3 else (
            torch.randn(4, 5), torch.randn(4, 7))
        head(*feats)["loss"].backward()
        assert [n for n, p in head.named_parameters() if p.grad is None] == []


def test_ae_latent_is_detached():
    head = DiffKDHead(6, 16, use_ae=True)
    out = head(torch.randn(2, 6, 3, 3), torch.randn(2, 16, 3, 3))
    assert not out["target"].requires_grad and out["target"].shape == (2, 8, 3, 3)
    out["kd_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in head.ae.parameters())


def test_gamma_is_about_one_half_at_initialisation():
    head = DiffKDHead(32, 32)
    gamma = head(torch.randn(16, 32, 4, 4), torch.randn(16, 32, 4, 4))["gamma"]
    assert gamma.shape == (16,) and ((gamma > 0) & (gamma < 1)).all()
    assert abs(gamma.mean().item() - 0.5) < 0.1


# ---- precision and layouts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel_size, use_ae", [(3, True), (1, False)])
def test_losses_finite_under_autocast(dtype, kernel_size, use_ae):
    head = DiffKDHead(8, 16, kernel_size=kernel_size, use_ae=use_ae)
    shape = (4, 8, 4, 4) if kernel_size == 3 else (4, 8)
    teacher_shape = (4, 16, 4, 4) if kernel_size == 3 else (4, 16)
    with torch.autocast("cpu", dtype=dtype):
        out = head(torch.randn(shape) * 3, torch.randn(teacher_shape) * 3)
    for key in ("loss", "kd_loss", "diffusion_loss", "ae_loss"):
        assert torch.isfinite(out[key]).all(), key
        assert out[key].dtype == torch.float32, key
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_vector_and_token_layouts_round_trip():
    vector = DiffKDHead(10, 12, kernel_size=1)
    out = vector(torch.randn(3, 10), torch.randn(3, 12))
    assert out["denoised"].shape == (3, 12) and out["target"].shape == (3, 12)
    tokens = DiffKDHead(6, 8)  # spatial head on 3×3 token maps
    teacher = torch.randn(2, 9, 8)
    out = tokens(torch.randn(2, 9, 6), teacher)
    assert out["denoised"].shape == (2, 9, 8)
    assert torch.equal(out["target"], teacher)


def test_kl_and_dist_distances_on_logits():
    for distance in ("kl", "dist"):
        head = DiffKDHead(10, 10, kernel_size=1, distance=distance, temperature=2.0)
        out = head(torch.randn(4, 10), torch.randn(4, 10))
        assert torch.isfinite(out["kd_loss"]) and out["kd_loss"] >= 0


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_size": 5}, "kernel_size must be 1 .* or 3 .*, got 5"),
    ({"inference_steps": 0}, r"inference_steps must be an integer in 1\.\.500"),
    ({"inference_steps": 501}, r"inference_steps must be an integer in 1\.\.500 .*, got 501"),
    ({"distance": "l1"}, "unknown distance 'l1'; expected one of mse, kl, dist"),
    ({"backend": "cuda"}, "unknown backend 'cuda'"),
    ({"timestep_start": "late"}, "unknown timestep_start 'late'"),
    ({"ae_channels": 4}, "ae_channels=4 was given but use_ae=False"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffKDHead(8, 8, **kwargs)


def test_spatial_head_needs_width_eight():
    with pytest.raises(ValueError, match="needs a working width of at least 8 channels .* got 4"):
        DiffKDHead(4, 4)


@pytest.mark.parametrize("student, teacher, message", [
    ((2, 5, 3, 3), (2, 8, 3, 3), "student feature has 5 channels .* student_channels=4"),
    ((2, 4, 3, 3), (2, 7, 3, 3), "teacher feature has 7 channels .* teacher_channels=8"),
    ((2, 4, 3, 3), (3, 8, 3, 3), "batch sizes differ: 2 vs 3"),
    ((2, 4, 4, 4), (2, 8, 3, 3), r"spatial sizes differ: \(4, 4\) vs \(3, 3\)"),
    ((1, 4, 3, 3), (1, 8, 3, 3), "a batch of one cannot be trained"),
    ((2, 4, 3, 3), (2, 8), "same layout"),
    ((2, 5, 4), (2, 6, 8), r"spatial sizes differ: \(5, 1\) vs \(6, 1\)"),  # sequences: B×C×N×1
])
def test_bad_inputs(student, teacher, message):
    head = DiffKDHead(4, 8)
    with pytest.raises(ValueError, match=message):
        head(torch.randn(student), torch.randn(teacher))


def test_batch_of_one_is_fine_in_eval_mode():
    out = DiffKDHead(4, 8).eval()(torch.randn(1, 4, 3, 3), torch.randn(1, 8, 3, 3))
    assert torch.isfinite(out["loss"])


def test_check_finite_and_noise_shapes():
    head = DiffKDHead(4, 8, check_finite=True)
    bad = torch.randn(2, 4, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="student feature contains NaN or Inf"):
        head(bad, torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"blend_noise must have shape \(2, 8, 3, 3\), got \(2, 8, 3\)"):
        head(torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3), blend_noise=torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match=r"diffusion_t must have shape \(2,\)"):
        head(torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3), diffusion_t=torch.tensor([1]))


def test_channels_last_computation_gives_the_same_values():
    fast = DiffKDHead(6, 16, use_ae=True)
    plain = DiffKDHead(6, 16, use_ae=True, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    student, teacher = torch.randn(3, 6, 5, 5), torch.randn(3, 16, 5, 5)
    a = fast(student, teacher, generator=torch.Generator().manual_seed(3))
    b = plain(student, teacher, generator=torch.Generator().manual_seed(3))
    for key in ("loss", "kd_loss", "diffusion_loss", "ae_loss", "denoised"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- noise diagnostics and chains of any length ----------------------------------------------------------------
def _relative_error(x, target):
    return ((x - target) ** 2).sum() / (target ** 2).sum()


@pytest.mark.parametrize("use_ae, kernel_size, use_anm", [(False, 3, True), (True, 3, True), (False, 1, True),
                                                          (False, 3, False)])
def test_noise_diagnostics_are_ratios_of_batch_sums(use_ae, kernel_size, use_anm):
    head = DiffKDHead(6, 16, use_ae=use_ae, kernel_size=kernel_size, use_anm=use_anm, backend="torch")
    size = 4 if kernel_size == 3 else 1
    student = torch.randn(3, 6, size, size, requires_grad=True)
    teacher = torch.randn(3, 16, size, size)
    out = head(student, teacher, generator=torch.Generator().manual_seed(5))
    z_s = F.conv2d(student, head.trans.weight, head.trans.bias).detach()
    target, denoised = out["target"], out["denoised"].detach()
    torch.testing.assert_close(out["rel_error_before"], _relative_error(z_s, target))
    torch.testing.assert_close(out["rel_error_after"], _relative_error(denoised, target))
    gamma = out["gamma"].detach()
    expected_spread = ((gamma - gamma.mean()) ** 2).mean().sqrt()
    torch.testing.assert_close(out["gamma_std"], expected_spread)
    assert (out["gamma_std"] == 0) == (not use_anm)
    for key in ("gamma_std", "rel_error_before", "rel_error_after"):
        assert out[key].shape == () and out[key].dtype == torch.float32 and not out[key].requires_grad, key


def test_noise_diagnostics_draw_no_random_numbers():
    """After a forward, the generator stands exactly after the official draws (blend, diffusion noise, t)."""
    head = DiffKDHead(6, 10, backend="torch").eval()
    student, teacher = torch.randn(2, 6, 3, 3), torch.randn(2, 10, 3, 3)
    generator = torch.Generator().manual_seed(11)
    head(student, teacher, generator=generator)
    expected = torch.Generator().manual_seed(11)
    for shape in ((2, 10, 3, 3), (2, 10, 3, 3)):
        torch.randn(shape, generator=expected)
    torch.randint(0, 1000, (2,), generator=expected)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=expected))


def _diffusers_chain(head, x, steps):
    """x after each step of diffusers' DDIM loop on DiffKD's grid for ``steps`` steps."""
    schedule, xs = DDIMSchedule(), []
    for t in schedule.inference_timesteps(2 * steps)[steps:]:
        eps = head.model.pred(x + head.model.time_embedding.weight[t][:, None, None])
        x = schedule.step(eps, t, x, 2 * steps, use_clipped_model_output=True)
        xs.append(x)
    return xs


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_denoise_runs_any_number_of_steps_and_returns_the_trajectory(kernel_size, steps):
    torch.manual_seed(0)
    head = DiffKDHead(6, 8, kernel_size=kernel_size, inference_steps=5, backend="torch").eval()
    x = torch.randn(2, 8, 3, 3) if kernel_size == 3 else torch.randn(2, 8, 1, 1)
    with torch.no_grad():
        final, trajectory = head.denoise(x, steps, return_trajectory=True)
        expected = _diffusers_chain(head, x, steps)
        assert len(trajectory) == steps and torch.equal(trajectory[-1], final)
        assert torch.equal(head.denoise(x, steps), final)
        for got, want in zip(trajectory, expected):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        assert torch.equal(head.denoise(x), head.denoise(x, 5))  # None: the head's own steps


def test_denoise_refuses_a_bad_number_of_steps():
    head = DiffKDHead(4, 8)
    with pytest.raises(ValueError, match=r"inference_steps must be an integer in 1\.\.500"):
        head.denoise(torch.randn(2, 8, 3, 3), 0)


# ---- compressions of the teacher feature and feature distances (--compression, --feature-distance) ------------
class _HeadOnPairs(torch.nn.Module):
    """Calls a head as a Distiller would: model(student feature, teacher feature)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, student, teacher):
        return self.head(student, teacher)


def _low_rank_teacher(batches=4, channels=16, rank=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(channels, rank, generator=generator)).Q  # channels × rank, orthonormal
    offset = torch.randn(channels, generator=generator)
    maps = []
    for _ in range(batches):
        codes = 3 * torch.randn(8, 4, 4, rank, generator=generator)
        noise = 0.01 * torch.randn(8, 4, 4, channels, generator=generator)
        maps.append((codes @ basis.T + noise + offset).permute(0, 3, 1, 2).contiguous())
    return maps, basis, offset


def test_pca_compression_finds_the_teacher_features_principal_subspace():
    from diffkd.compression import fit_compressions

    teacher_maps, basis, offset = _low_rank_teacher()
    head = DiffKDHead(8, 16, kernel_size=1, use_ae=True, ae_channels=3, compression="pca", inference_steps=1)
    batches = [(torch.randn(8, 8, 4, 4), t) for t in teacher_maps]
    with pytest.raises(RuntimeError, match="fit_compressions"):
        head(*batches[0])
    assert fit_compressions(_HeadOnPairs(head), batches, images=16) == 16
    projection = head.ae.encoder
    assert bool(projection.fitted) and torch.allclose(projection.mean, offset, atol=0.2)
    outside = projection.weight @ (torch.eye(16) - basis @ basis.T)  # the rows' part outside the subspace
    assert float(outside.norm()) < 0.05
    assert head.training and fit_compressions(_HeadOnPairs(head), batches) == 0  # fitted already: nothing to do


def test_random_compression_is_orthonormal_seeded_and_kept_by_the_state_dict():
    from diffkd.compression import fit_compressions

    teacher_maps, _, offset = _low_rank_teacher()
    heads = [DiffKDHead(8, 16, kernel_size=1, use_ae=True, ae_channels=4, compression="random",
                        inference_steps=1) for _ in range(2)]
    weight = heads[0].ae.encoder.weight
    assert torch.allclose(weight @ weight.T, torch.eye(4), atol=1e-5)
    assert torch.equal(weight, heads[1].ae.encoder.weight)
    fit_compressions(_HeadOnPairs(heads[0]), [(torch.randn(8, 8, 4, 4), t) for t in teacher_maps])
    assert torch.allclose(heads[0].ae.encoder.mean, offset, atol=0.2)
    heads[1].load_state_dict(heads[0].state_dict())
    out = heads[1](torch.randn(8, 8, 4, 4), teacher_maps[0])  # fitted through the checkpoint: it runs
    assert float(out["ae_loss"]) == 0.0 and out["target"].shape == (8, 4, 4, 4)
    out["loss"].backward()
    assert heads[1].trans.weight.grad is not None and not any(
        p.requires_grad for p in heads[1].ae.parameters())


def test_compression_options_are_validated():
    with pytest.raises(ValueError, match="use_ae=True"):
        DiffKDHead(8, 16, compression="pca")
    with pytest.raises(ValueError, match="unknown compression"):
        DiffKDHead(8, 16, use_ae=True, ae_channels=8, compression="svd")
    assert DiffKDHead(8, 16).compression == "none" and DiffKDHead(8, 16, use_ae=True).compression == "ae"


def test_method_settings_resolve_compression_and_feature_distance():
    from diffkd.methods import build_heads, method_settings

    assert method_settings("diffkd", "fashion-mnist").compression == "none"
    assert method_settings("diffkd", "fashion-mnist", ae_channels=32).compression == "ae"
    assert method_settings("diffkd", "imagenet", compression="none").ae_channels == 0
    with pytest.raises(ValueError, match="--ae-channels"):
        method_settings("diffkd", "fashion-mnist", compression="pca")
    with pytest.raises(ValueError, match="unknown feature distance"):
        method_settings("diffkd", "fashion-mnist", feature_distance="kl")
    settings = method_settings("diffkd", "fashion-mnist", compression="random", ae_channels=8,
                               feature_distance="pearson")
    heads = build_heads(settings, {"feature": (8, 4, 4), "logit": (10,)}, {"feature": (16, 4, 4), "logit": (10,)})
    assert heads["feature"].compression == "random" and heads["feature"].distance == "pearson"
    assert heads["logit"].compression == "none" and heads["logit"].distance == "kl"


@pytest.mark.parametrize("distance", ["cosine", "pearson"])
def test_feature_head_trains_with_a_scale_free_distance(distance):
    head = DiffKDHead(8, 16, distance=distance, inference_steps=1)
    out = head(torch.randn(4, 8, 4, 4), 10 * torch.randn(4, 16, 4, 4))
    assert 0.0 <= float(out["kd_loss"].detach()) <= 2.0
    out["loss"].backward()
    assert head.trans.weight.grad is not None


def test_logit_kd_beside_the_diffkd_feature_head():
    from diffkd.methods import LogitDistillation, build_heads, method_settings

    settings = method_settings("diffkd", "fashion-mnist", heads="feature", logit_kd_weight=0.9)
    assert settings.head_kinds == ("feature", "logit")
    heads = build_heads(settings, {"feature": (8, 4, 4), "logit": (10,)}, {"feature": (16, 4, 4), "logit": (10,)})
    assert isinstance(heads["feature"], DiffKDHead) and isinstance(heads["logit"], LogitDistillation)
    assert (heads["logit"].weight, heads["logit"].temperature) == (0.9, 4.0)
    with pytest.raises(ValueError, match="--heads feature"):
        method_settings("diffkd", "fashion-mnist", logit_kd_weight=0.9)
    with pytest.raises(ValueError, match="--heads feature"):
        method_settings("mse", "fashion-mnist", logit_kd_weight=0.9)
