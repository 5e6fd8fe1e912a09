"""The DiffKD head as a user of the paper's code has it: the baseline of the head-level benchmarks.

Written the way the official DiffKD module runs: plain ``nn.Conv2d`` layers, diffusers' ``DDIMScheduler``
(``clip_sample=False``, linear betas) stepped in a Python loop — ``set_timesteps(2·NFE)`` on every call, the lower
half of the grid, ``use_clipped_model_output=True`` — the noise blend and every loss as separate eager ops.
The module tree has the official names (``trans``, ``ae``, ``model.time_embedding``, ``model.pred``,
``noise_adapter``, ``proj``), which are also :class:`diffkd.DiffKDHead`'s, so :meth:`NaiveDiffKDHead.from_head`
shares a head's weights through its state dict.

Without diffusers installed, the loop steps :meth:`diffkd.DDIMSchedule.step` instead (diffusers' semantics: the
x̂0 form, ε re-derived from x̂0) and :attr:`PaperScheduler.source` says so.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffkd import DDIMSchedule, DiffKDHead
from diffkd.modules import TIME_EMBEDDING_ROWS


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


class PaperScheduler:
    """The scheduler calls of the official pipeline: diffusers' DDIMScheduler, or DDIMSchedule as a stand-in."""

    def __init__(self, num_train_timesteps: int = 1000, use_diffusers: bool | None = None):
        if use_diffusers is None:
            use_diffusers = diffusers_available()
        if use_diffusers:
            import diffusers
            from diffusers import DDIMScheduler

            self._diffusers = DDIMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False,
                                            beta_schedule="linear")
            self.source = f"diffusers {diffusers.__version__} DDIMScheduler"
        else:
            self._diffusers = None
            self._schedule = DDIMSchedule(num_train_timesteps)
            self.source = "diffkd.DDIMSchedule.step (diffusers semantics; diffusers is not installed)"
        self.num_train_timesteps = num_train_timesteps
        self._num_steps = None

    def chain_timesteps(self, inference_steps: int) -> torch.Tensor:
        """The pipeline's ``set_timesteps(2·NFE)`` and the lower half of the grid (t = 400, …, 0 for NFE 5)."""
        self._num_steps = 2 * inference_steps
        if self._diffusers is not None:
            self._diffusers.set_timesteps(self._num_steps)
            grid = self._diffusers.timesteps
        else:
            grid = self._schedule.inference_timesteps(self._num_steps)
        return grid[len(grid) // 2:]

    def step(self, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self._diffusers is not None:
            return self._diffusers.step(model_output, t, sample, eta=0.0, use_clipped_model_output=True)["prev_sample"]
        return self._schedule.step(model_output, t, sample, self._num_steps, use_clipped_model_output=True)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q-sampling with per-sample timesteps, as diffusers' ``add_noise`` (ᾱ cast to the sample's dtype)."""
        if self._diffusers is not None:
            return self._diffusers.add_noise(original, noise, timesteps)
        alphas_cumprod = self._schedule.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        alpha_bar = alphas_cumprod[timesteps.to(original.device)]
        shape = (-1,) + (1,) * (original.dim() - 1)
        return alpha_bar.sqrt().view(shape) * original + (1 - alpha_bar).sqrt().view(shape) * noise


class NaiveBottleneck(nn.Module):
    """The official Bottleneck: 1×1, BN, ReLU, 3×3, BN, ReLU, 1×1, BN, plus the input."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = channels // reduction
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x


class NaiveDiffusionModel(nn.Module):
    """The official DiffusionModel: x + E[t] then the spatial or vector stack."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_embedding = nn.Embedding(TIME_EMBEDDING_ROWS, channels)
        if kernel_size == 3:
            self.pred = nn.Sequential(NaiveBottleneck(channels), NaiveBottleneck(channels),
                                      nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        else:
            wide = channels * 4
            self.pred = nn.Sequential(
                nn.Conv2d(channels, wide, 1), nn.BatchNorm2d(wide), nn.ReLU(inplace=True),
                nn.Conv2d(wide, channels, 1), nn.BatchNorm2d(channels),
                nn.Conv2d(channels, wide, 1), nn.BatchNorm2d(wide), nn.ReLU(inplace=True),
                nn.Conv2d(wide, channels, 1),
            )

    def forward(self, noisy_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.long:
            t = t.type(torch.long)
        feat = noisy_image + self.time_embedding(t)[..., None, None]
        return self.pred(feat)


class NaiveNoiseAdapter(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size == 3:
            self.feat = nn.Sequential(NaiveBottleneck(channels, reduction=8), nn.AdaptiveAvgPool2d(1))
        else:
            self.feat = nn.Sequential(
                nn.Conv2d(channels, channels * 2, 1), nn.BatchNorm2d(channels * 2), nn.ReLU(inplace=True),
                nn.Conv2d(channels * 2, channels, 1), nn.BatchNorm2d(channels),
            )
        self.pred = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feat(x).flatten(1)
        return self.pred(x).softmax(1)[:, 0]


class NaiveAutoEncoder(nn.Module):
    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, latent_channels, 1), nn.BatchNorm2d(latent_channels))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(x)
        return hidden, self.decoder(hidden)


def naive_denoise(model: nn.Module, scheduler: PaperScheduler, image: torch.Tensor,
                  inference_steps: int) -> torch.Tensor:
    """The official pipeline's loop: Φ then the scheduler's step, timestep by timestep."""
    for t in scheduler.chain_timesteps(inference_steps):
        noise_pred = model(image, t.to(image.device))
        image = scheduler.step(noise_pred, t, image)
    return image


class NaiveDiffKDHead(nn.Module):
    """The official DiffKD module plus its distiller's losses, in plain eager PyTorch.

    ``forward`` returns ``loss`` (= kd + diffusion + ae, every weight 1), ``kd_loss``, ``diffusion_loss``,
    ``ae_loss`` and ``denoised``.  Random numbers are drawn in the official order (blend noise, diffusion noise,
    diffusion timesteps) unless given.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, kernel_size: int = 3, use_ae: bool = False,
                 ae_channels: int | None = None, inference_steps: int = 5, distance: str = "mse",
                 temperature: float = 1.0, scheduler: PaperScheduler | None = None):
        super().__init__()
        if distance not in ("mse", "kl"):
            raise ValueError(f"the naive head implements distance 'mse' and 'kl', got {distance!r}")
        self.use_ae, self.kernel_size, self.distance = use_ae, kernel_size, distance
        self.inference_steps, self.temperature = inference_steps, temperature
        if use_ae:
            ae_channels = teacher_channels // 2 if ae_channels is None else ae_channels
            self.ae = NaiveAutoEncoder(teacher_channels, ae_channels)
            teacher_channels = ae_channels
        self.trans = nn.Conv2d(student_channels, teacher_channels, 1)
        self.model = NaiveDiffusionModel(teacher_channels, kernel_size)
        self.noise_adapter = NaiveNoiseAdapter(teacher_channels, kernel_size)
        self.proj = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, 1), nn.BatchNorm2d(teacher_channels))
        self.scheduler = scheduler if scheduler is not None else PaperScheduler()

    @classmethod
    def from_head(cls, head: DiffKDHead, scheduler: PaperScheduler | None = None) -> NaiveDiffKDHead:
        """A naive twin of ``head`` (same configuration, device, dtype and weights)."""
        if not head.use_anm or head.timestep_start != "official" or head.distance not in ("mse", "kl"):
            raise ValueError("the naive head mirrors the official configuration: use_anm=True, timestep_start="
                             f"'official', distance 'mse' or 'kl'; got use_anm={head.use_anm}, timestep_start="
                             f"{head.timestep_start!r}, distance={head.distance!r}")
        naive = cls(head.student_channels, head.teacher_channels, kernel_size=head.kernel_size, use_ae=head.use_ae,
                    ae_channels=head.width if head.use_ae else None, inference_steps=head.inference_steps,
                    distance=head.distance, temperature=head.temperature, scheduler=scheduler)
        reference = next(head.parameters())
        naive.to(device=reference.device, dtype=reference.dtype)
        naive.load_state_dict(head.state_dict(), strict=True)
        naive.train(head.training)
        return naive

    def _kd_loss(self, refined: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.distance == "mse":
            return F.mse_loss(refined, target)
        s, t, tau = refined.flatten(1), target.flatten(1), self.temperature
        return F.kl_div(F.log_softmax(s / tau, dim=1), F.softmax(t / tau, dim=1), reduction="batchmean") * tau ** 2

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                blend_noise: torch.Tensor | None = None, diffusion_noise: torch.Tensor | None = None,
                diffusion_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        vector = student_feat.dim() == 2
        if vector:
            student_feat, teacher_feat = student_feat[..., None, None], teacher_feat[..., None, None]
        student_feat = self.trans(student_feat)
        if self.use_ae:
            hidden_t_feat, rec_t_feat = self.ae(teacher_feat)
            ae_loss = F.mse_loss(teacher_feat, rec_t_feat)
            teacher_feat = hidden_t_feat.detach()
        else:
            ae_loss = student_feat.new_zeros(())

        # The pipeline: noise, γ from the adapter, the convex blend, the DDIM loop, proj.
        noise = torch.randn(student_feat.shape, device=student_feat.device, dtype=student_feat.dtype) \
            if blend_noise is None else blend_noise
        gamma = self.noise_adapter(student_feat)
        gamma_b = gamma.flatten()
        while gamma_b.dim() < student_feat.dim():
            gamma_b = gamma_b.unsqueeze(-1)
        one_minus_gamma = (1 - gamma).flatten()
        while one_minus_gamma.dim() < student_feat.dim():
            one_minus_gamma = one_minus_gamma.unsqueeze(-1)
        image = gamma_b * student_feat + one_minus_gamma * noise
        refined = self.proj(naive_denoise(self.model, self.scheduler, image, self.inference_steps))

        # ddim_loss: the diffusion model trained on the teacher feature.
        if diffusion_noise is None:
            diffusion_noise = torch.randn(teacher_feat.shape, device=teacher_feat.device)
        if diffusion_t is None:
            diffusion_t = torch.randint(0, self.scheduler.num_train_timesteps, (teacher_feat.shape[0],),
                                        device=teacher_feat.device).long()
        noisy = self.scheduler.add_noise(teacher_feat, diffusion_noise, diffusion_t)
        diffusion_loss = F.mse_loss(self.model(noisy, diffusion_t), diffusion_noise)

        kd_loss = self._kd_loss(refined, teacher_feat)
        loss = kd_loss + diffusion_loss + ae_loss
        return {"loss": loss, "kd_loss": kd_loss, "diffusion_loss": diffusion_loss, "ae_loss": ae_loss,
                "denoised": refined.flatten(1) if vector else refined}


def explicit_noises(head: DiffKDHead, student: torch.Tensor, teacher: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Blend noise, diffusion noise and diffusion timesteps for one call of ``head`` on these inputs."""
    batch = student.shape[0]
    spatial = student.shape[2:] if student.dim() == 4 else (1, 1)
    device = student.device
    blend = torch.randn(batch, head.width, *spatial, generator=generator, device="cpu").to(device, student.dtype)
    diffusion = torch.randn(batch, head.width, *spatial, generator=generator, device="cpu").to(device, teacher.dtype)
    t = torch.randint(0, head.schedule.num_train_timesteps, (batch,), generator=generator).to(device)
    return {"blend_noise": blend, "diffusion_noise": diffusion, "diffusion_t": t}


# What compare_heads' verdict rests on; "param_grads_worst_single" is reported for information.
CHECKED_ERRORS = ("losses", "denoised", "student_grad", "param_grads")


def worst_error(errors: dict[str, float]) -> float:
    return max(errors[key] for key in CHECKED_ERRORS)


def compare_heads(head: nn.Module, naive: nn.Module, student: torch.Tensor, teacher: torch.Tensor,
                  noises: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative errors of ``head`` against ``naive`` on one forward+backward with the same explicit noises.

    ``losses``: the worst of the four losses; ``denoised``: the chain's output; ``student_grad``: the gradient
    of the student feature; ``param_grads``: all parameter gradients (matched by name) as one vector, so every
    parameter counts in proportion to its gradient; ``param_grads_worst_single``: the worst single parameter
    (information only: the noise adapter's small gradients come through dγ = Σ g·(z − ε), a long reduction whose
    rounding depends on the memory format).  Both heads' BatchNorm statistics advance by one step.
    """
    from diffkd.graphs import relative_error

    results = {}
    outputs, grads = [], []
    for module in (head, naive):
        module.zero_grad(set_to_none=True)
        s = student.detach().clone().requires_grad_(True)
        out = module(s, teacher, **noises)
        out["loss"].backward()
        outputs.append(out)
        grads.append((s.grad, {name: p.grad for name, p in module.named_parameters() if p.grad is not None}))
    ours, theirs = outputs
    results["losses"] = max(relative_error(ours[k].float(), theirs[k].float())
                            for k in ("loss", "kd_loss", "diffusion_loss", "ae_loss"))
    results["denoised"] = relative_error(ours["denoised"], theirs["denoised"])
    results["student_grad"] = relative_error(grads[0][0], grads[1][0])
    if set(grads[0][1]) != set(grads[1][1]):
        missing = sorted(set(grads[1][1]) ^ set(grads[0][1]))
        raise ValueError(f"the heads' gradients reach different parameters: {', '.join(missing[:5])}")
    ours_grads, their_grads = grads[0][1], grads[1][1]
    differences = {name: (ours_grads[name].double() - their_grads[name].double()).norm().item() for name in their_grads}
    norms = {name: their_grads[name].double().norm().item() for name in their_grads}
    total = max(sum(n * n for n in norms.values()) ** 0.5, 1e-30)
    results["param_grads"] = sum(d * d for d in differences.values()) ** 0.5 / total
    # Conv biases in front of train-mode BatchNorm have a zero gradient (rounding noise only): a single
    # parameter's error is measured against its own gradient norm floored at 1e-3 of the whole gradient's norm.
    results["param_grads_worst_single"] = max(differences[name] / max(norms[name], 1e-3 * total) for name in norms)
    return results
