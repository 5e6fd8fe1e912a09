"""The DiffKD head and its parts, as in the paper and its official code.

The module tree mirrors the official DiffKD module, so a head's ``state_dict`` has exactly the official keys
(``trans``, ``ae.encoder.0``, ``model.time_embedding``, ``model.pred.*``, ``noise_adapter.*``, ``proj.*``) and
official checkpoints load strictly (``load_official_state_dict``).  Every 1×1 convolution goes through
``kernels.conv1x1`` and the chain through the fused DDIM ops, with the head's backend.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from diffkd.compression import COMPRESSIONS, FixedCompression
from diffkd.losses import DISTANCES
from diffkd.schedule import TIMESTEP_STARTS, DDIMSchedule

TIME_EMBEDDING_ROWS = 1280


class Conv1x1(nn.Conv2d):
    """A 1×1 convolution with bias (same parameters as ``nn.Conv2d``) computed by ``kernels.conv1x1``."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size=1)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.conv1x1(x, self.weight, self.bias, backend=self.backend)


class Bneck(nn.Module):
    """Residual bottleneck: 1×1 C→C/r, BN, ReLU, 3×3, BN, ReLU, 1×1 C/r→C, BN, plus the input (no final ReLU)."""

    def __init__(self, channels: int, reduction: int = 4, backend: str = "auto"):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"Bneck needs channels >= reduction, got channels={channels}, reduction={reduction}")
        self.block = nn.Sequential(
            Conv1x1(channels, hidden, backend), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            Conv1x1(hidden, channels, backend), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + x


def _expand_contract(channels: int, expansion: int, backend: str) -> list[nn.Module]:
    """1×1 C→eC, BN, ReLU, 1×1 eC→C, BN: the building block of the vector (logit) variants."""
    wide = channels * expansion
    return [Conv1x1(channels, wide, backend), nn.BatchNorm2d(wide), nn.ReLU(inplace=True),
            Conv1x1(wide, channels, backend), nn.BatchNorm2d(channels)]


class Denoiser(nn.Module):
    """Φ(x, t): the noise predictor, x + E[t] then the spatial (kernel 3) or vector (kernel 1) stack."""

    def __init__(self, channels: int, kernel_size: int = 3, backend: str = "auto"):
        super().__init__()
        self.time_embedding = nn.Embedding(TIME_EMBEDDING_ROWS, channels)
        if kernel_size == 3:
            layers = [Bneck(channels, 4, backend), Bneck(channels, 4, backend), Conv1x1(channels, channels, backend),
                      nn.BatchNorm2d(channels)]
        else:
            # Two expand-contract blocks; the official stack has no BatchNorm after the last conv.
            layers = _expand_contract(channels, 4, backend) + _expand_contract(channels, 4, backend)[:-1]
        self.pred = nn.Sequential(*layers)

    def embedding(self, t: torch.Tensor) -> torch.Tensor:
        """E[t] shaped to broadcast over a map: (C,1,1) for a scalar t, (B,C,1,1) for per-sample t."""
        return self.time_embedding(t)[..., None, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.pred(x + self.embedding(t).to(x.dtype))


class NoiseAdapter(nn.Module):
    """Adaptive noise matching: predicts γ ∈ (0, 1), one per sample, the weight of the student feature."""

    def __init__(self, channels: int, kernel_size: int = 3, backend: str = "auto"):
        super().__init__()
        if kernel_size == 3:
            self.feat = nn.Sequential(Bneck(channels, 8, backend), nn.AdaptiveAvgPool2d(1))
        else:
            # The pool is the identity on the 1×1 maps of the vector variant; it lets kernel_size=1 take larger maps.
            self.feat = nn.Sequential(*_expand_contract(channels, 2, backend), nn.AdaptiveAvgPool2d(1))
        self.pred = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.feat(x).flatten(1)).float().softmax(dim=1)[:, 0]


class LinearAutoencoder(nn.Module):
    """Compresses the teacher feature: encoder 1×1 conv + BN (the latent), decoder 1×1 conv."""

    def __init__(self, channels: int, latent_channels: int, backend: str = "auto"):
        super().__init__()
        self.encoder = nn.Sequential(Conv1x1(channels, latent_channels, backend), nn.BatchNorm2d(latent_channels))
        self.decoder = nn.Sequential(Conv1x1(latent_channels, channels, backend))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)
        return latent, self.decoder(latent)


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}"


@torch.no_grad()
def relative_squared_error(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ‖x − target‖² / Σ‖target‖² over the whole batch (a ratio of sums), float32, without a host sync."""
    target = target.float()
    energy = target.square().sum().clamp_min(torch.finfo(torch.float32).tiny)
    return F.mse_loss(x.float(), target, reduction="sum") / energy


@torch.no_grad()
def noise_diagnostics(gamma: torch.Tensor, z_s: torch.Tensor, denoised: torch.Tensor,
                      z_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scalar terms that show what the head does (see ``DiffKDHead``); no gradient, no effect on training."""
    return {"gamma_std": gamma.float().std(correction=0),
            "rel_error_before": relative_squared_error(z_s, z_t),
            "rel_error_after": relative_squared_error(denoised, z_t)}


FEATURE_NORMS = ("none", "channel")


def standardize_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each channel of a B×C×H×W map to mean 0 and standard deviation 1 over the batch and all positions, as
    mmrazor's PKD normalises FPN maps before its distance (population std; a constant channel becomes 0)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False).add(eps).sqrt()
    return (x - mean) / std


class DiffKDHead(nn.Module):
    """One DiffKD head: distils one (student feature, teacher feature) pair.

    trans → noise adapter γ → blend γ·Z_s + (1−γ)·ε → DDIM chain of Φ → proj → distance to Z_t, plus the
    diffusion loss of Φ on Z_t and, with ``use_ae``, the autoencoder's reconstruction loss.

    Inputs may be B×C×H×W maps, B×K vectors (handled as B×K×1×1) or B×N×C token sequences of any length N
    (handled as B×C×N×1, where the 3×3 convolutions act as 1-D convolutions of width 3 along the sequence; turn
    image tokens into a B×C×h×w grid first for a 2-D denoiser).  ``denoised`` and ``target`` come back in the
    input's layout.
    With ``channels_last`` (default) the head computes in channels-last memory format, which is faster on CPU
    and GPU and gives the same values.

    ``forward`` returns ``loss`` (the weighted sum to optimise), ``kd_loss``, ``diffusion_loss``, ``ae_loss``,
    ``gamma`` (one per sample), ``denoised`` and ``target``, and three diagnostics of the paper's premise that
    the student feature is a noisy teacher feature.  They are float32 scalars computed without gradient (no
    host synchronisation, no random numbers, no effect on any loss):

    - ``gamma_std``: the spread of γ over the batch (population standard deviation; 0 without ANM, where γ = 1);
    - ``rel_error_before``: Σ‖Z_s − Z_t‖² / Σ‖Z_t‖², sums over the whole batch (a ratio of sums, not a mean of
      per-sample ratios), with Z_s = trans(student feature), the working-width student feature before the
      noise blend, and Z_t the target (the teacher feature, or its autoencoder latent);
    - ``rel_error_after``: the same for the denoised feature, Σ‖proj(chain(x_T)) − Z_t‖² / Σ‖Z_t‖².  It
      includes what ``proj`` learns, so a drop from before to after is the chain and ``proj`` together;
      ``diffkd.diagnose`` separates the chain's part by varying the number of steps.

    ``denoise(x, steps, return_trajectory=True)`` runs the chain with any number of steps and returns every
    intermediate x.

    ``feature_norm="channel"`` standardises each channel (:func:`standardize_channels`) of the denoised feature
    and of the target before the KD distance only, PKD-style, so that the KD term does not scale with the
    teacher's raw activations (a trained detector's FPN maps have mean squares up to ~100).  The diffusion model
    and the autoencoder still learn on the teacher's own, unnormalised distribution, and the diagnostics compare
    raw features.  ``"none"`` (default) is the paper's distance on raw features.

    With ``use_ae`` the teacher feature is compressed to ``ae_channels``: ``compression="ae"`` (default) is the
    paper's linear autoencoder, learned beside the head; ``"pca"`` and ``"random"`` are fixed projections
    (:mod:`diffkd.compression`) fitted once before training with ``diffkd.compression.fit_compressions``.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, kernel_size: int = 3, use_ae: bool = False,
                 ae_channels: int | None = None, compression: str = "ae", inference_steps: int = 5,
                 timestep_start: str = "official",
                 use_anm: bool = True, distance: str = "mse", temperature: float = 1.0, kd_weight: float = 1.0,
                 diffusion_weight: float = 1.0, ae_weight: float = 1.0, backend: str = "auto",
                 check_finite: bool = False, channels_last: bool = True, num_train_timesteps: int = 1000,
                 feature_norm: str = "none"):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature_norm {feature_norm!r}; expected one of {', '.join(FEATURE_NORMS)}")
        self.feature_norm = feature_norm
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 (vector/logit variant) or 3 (spatial variant), got {kernel_size!r}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
        if timestep_start not in TIMESTEP_STARTS:
            raise ValueError(f"unknown timestep_start {timestep_start!r}; expected one of {', '.join(TIMESTEP_STARTS)}")
        kernels._common.validate_backend_name(backend)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.schedule = DDIMSchedule(num_train_timesteps)
        step_a, step_b = self.schedule.step_coefficients(inference_steps, timestep_start)  # validates the steps
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.kernel_size, self.use_anm, self.distance = kernel_size, use_anm, distance
        self.inference_steps, self.timestep_start = inference_steps, timestep_start
        self.temperature, self.check_finite, self.backend = temperature, check_finite, backend
        # Channels-last maps let oneDNN (CPU) and cuDNN run the convolutions and BatchNorms without layout
        # reorders, and make every 1×1 conv a plain GEMM over (B·H·W)×C; the values are the same either way.
        self.channels_last = channels_last
        self.kd_weight, self.diffusion_weight, self.ae_weight = kd_weight, diffusion_weight, ae_weight
        # Python floats: they go into the kernels by value (and into CUDA graphs as constants).
        self._step_a, self._step_b = step_a.tolist(), step_b.tolist()
        # Host ints: indexing the embedding table with them needs no device synchronisation.
        self.chain_timesteps = tuple(self.schedule.timesteps(inference_steps, timestep_start).tolist())
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod.clone(), persistent=False)

        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
        if compression != "ae" and not use_ae:
            raise ValueError(f"compression={compression!r} compresses the teacher feature: pass use_ae=True and "
                             f"ae_channels (the latent width)")
        self.use_ae, self.compression = use_ae, compression if use_ae else "none"
        if use_ae:
            ae_channels = teacher_channels // 2 if ae_channels is None else ae_channels
            if not isinstance(ae_channels, int) or ae_channels < 1:
                raise ValueError(f"ae_channels must be a positive integer, got {ae_channels!r}")
            self.ae = (LinearAutoencoder(teacher_channels, ae_channels, backend) if compression == "ae"
                       else FixedCompression(teacher_channels, ae_channels, compression))
            width = ae_channels
        elif ae_channels is not None:
            raise ValueError(f"ae_channels={ae_channels} was given but use_ae=False; pass use_ae=True to use it")
        else:
            width = teacher_channels
        if kernel_size == 3 and width < 8:
            raise ValueError(f"the spatial head (kernel_size=3) needs a working width of at least 8 channels (the noise "
                             f"adapter's bottleneck divides it by 8), got {width}; use more channels or kernel_size=1")
        self.width = width
        self.trans = Conv1x1(student_channels, width, backend)
        self.model = Denoiser(width, kernel_size, backend)
        self.noise_adapter = NoiseAdapter(width, kernel_size, backend) if use_anm else None
        self.proj = nn.Sequential(Conv1x1(width, width, backend), nn.BatchNorm2d(width))

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"width={self.width}, kernel_size={self.kernel_size}, compression={self.compression!r}, "
                f"inference_steps={self.inference_steps}, timesteps={list(self.chain_timesteps)}, "
                f"use_anm={self.use_anm}, distance={self.distance!r}, backend={self.backend!r}")

    # ---- input handling --------------------------------------------------------------------------------------
    @staticmethod
    def _to_map(x: torch.Tensor, role: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{role} feature must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4:
            return x
        if x.dim() == 2:
            return x[:, :, None, None]
        if x.dim() == 3:
            # A sequence of any length as a B×C×N×1 map: beside its one column the 3×3 convolutions see only zero
            # padding, so they act as 1-D convolutions of width 3 along the sequence (the same for every N).
            return x.transpose(1, 2)[..., None]
        raise ValueError(f"{role} feature: expected B×C×H×W, B×K or B×N×C, got {_describe(x)}")

    @staticmethod
    def _from_map(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 2:
            return x.flatten(1)
        if like.dim() == 3:
            return x.flatten(2).transpose(1, 2)
        return x

    def _check_inputs(self, student: torch.Tensor, teacher: torch.Tensor, s_map, t_map) -> None:
        if student.dim() != teacher.dim():
            raise ValueError(f"student and teacher features must have the same layout, got student {_describe(student)} "
                             f"and teacher {_describe(teacher)}")
        if s_map.shape[1] != self.student_channels:
            raise ValueError(f"student feature has {s_map.shape[1]} channels ({_describe(student)}), but the head was "
                             f"built with student_channels={self.student_channels}")
        if t_map.shape[1] != self.teacher_channels:
            raise ValueError(f"teacher feature has {t_map.shape[1]} channels ({_describe(teacher)}), but the head was "
                             f"built with teacher_channels={self.teacher_channels}")
        if s_map.shape[0] != t_map.shape[0]:
            raise ValueError(f"student and teacher batch sizes differ: {s_map.shape[0]} vs {t_map.shape[0]}")
        if s_map.shape[2:] != t_map.shape[2:]:
            raise ValueError(f"student and teacher spatial sizes differ: {tuple(s_map.shape[2:])} vs "
                             f"{tuple(t_map.shape[2:])}; pool the larger map first (diffkd.DiffKDLoss does this)")
        if self.training and s_map.shape[0] < 2:
            raise ValueError("a batch of one cannot be trained: the head's BatchNorm layers need at least 2 samples "
                             "in training mode (drop the last incomplete batch, or call head.eval())")
        if s_map.device != t_map.device:
            raise ValueError(f"student feature is on {s_map.device} but teacher feature is on {t_map.device}")
        if self.check_finite:
            for role, x in (("student", student), ("teacher", teacher)):
                if not torch.isfinite(x).all():
                    raise ValueError(f"{role} feature contains NaN or Inf values ({_describe(x)})")

    @staticmethod
    def _check_noise(name: str, noise: torch.Tensor | None, expected: torch.Size) -> None:
        if noise is not None and noise.shape != expected:
            raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(noise.shape)}")

    # ---- randomness --------------------------------------------------------------------------------------------
    @staticmethod
    def _normal(shape, generator, like: torch.Tensor) -> torch.Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)

    @staticmethod
    def _seed(generator, like: torch.Tensor) -> torch.Tensor:
        """A kernel noise seed, kept in device memory (CUDA graphs replay it by address), offset by DDP rank."""
        device = generator.device if generator is not None else like.device
        seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=device).to(like.device)
        if dist.is_available() and dist.is_initialized():
            seed = seed + dist.get_rank()
        return seed

    # ---- the method ------------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, steps: int | None = None, *,
                return_trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The deterministic DDIM chain x_T → x_0 with Φ, each step the fused affine x ← A·x + B·ε̂.

        ``steps`` runs the trained Φ on the grid of another number of steps (NFE, 1..500; the paper's ablation
        varies it from 1 to 20); None is the head's own ``inference_steps``, the chain training uses.  With
        ``return_trajectory`` the result is ``(x_0, [x after step 1, …, x after the last step])``.
        """
        if steps is None or steps == self.inference_steps:
            timesteps, step_a, step_b = self.chain_timesteps, self._step_a, self._step_b
        else:
            coefficients = self.schedule.step_coefficients(steps, self.timestep_start)  # validates steps
            timesteps = tuple(self.schedule.timesteps(steps, self.timestep_start).tolist())
            step_a, step_b = (c.tolist() for c in coefficients)
        table = self.model.time_embedding.weight
        trajectory = []
        model_input = x + table[timesteps[0]].to(x.dtype)[:, None, None]
        for k, (a, b) in enumerate(zip(step_a, step_b)):
            eps = self.model.pred(model_input).to(x.dtype)
            if k + 1 < len(timesteps):
                x, model_input = kernels.ddim_step_embed(x, eps, a, b, table[timesteps[k + 1]].to(x.dtype),
                                                         backend=self.backend)
            else:
                x = kernels.ddim_step(x, eps, a, b, backend=self.backend)
            if return_trajectory:
                trajectory.append(x)
        return (x, trajectory) if return_trajectory else x

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                generator: torch.Generator | None = None, blend_noise: torch.Tensor | None = None,
                diffusion_noise: torch.Tensor | None = None,
                diffusion_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        s_map, t_map = self._to_map(student_feat, "student"), self._to_map(teacher_feat, "teacher")
        self._check_inputs(student_feat, teacher_feat, s_map, t_map)
        batch = s_map.shape[0]
        if self.channels_last:
            s_map = s_map.contiguous(memory_format=torch.channels_last)
            t_map = t_map.contiguous(memory_format=torch.channels_last)
        z_s = self.trans(s_map)
        if self.use_ae:
            latent, reconstruction = self.ae(t_map.detach())
            ae_loss = (kernels.squared_error_mean(reconstruction, t_map.detach(), backend=self.backend)
                       if reconstruction is not None else z_s.new_zeros((), dtype=torch.float32))  # fixed: no decoder
            z_t = latent.detach()  # diffusion data and KD target; the AE learns from its own loss only
        else:
            ae_loss = z_s.new_zeros((), dtype=torch.float32)
            z_t = t_map.detach()
        self._check_noise("blend_noise", blend_noise, z_s.shape)
        self._check_noise("diffusion_noise", diffusion_noise, z_t.shape)
        if diffusion_t is not None and diffusion_t.shape != (batch,):
            raise ValueError(f"diffusion_t must have shape ({batch},), got {tuple(diffusion_t.shape)}")
        # Random numbers in the official order: blend noise, diffusion noise, diffusion timesteps.  A noise is
        # drawn in-kernel from a seed only when every op that reads it runs Triton (per op, as the kernels'
        # resolver says, e.g. by its table AUTO_TRITON_IN_GRAPHS inside a CUDA graph); otherwise it is drawn as a
        # tensor and given to each of its ops, so q_sample and the diffusion loss always see the same noise, and a
        # seed tensor never reaches a PyTorch op (int(seed) would synchronise, which a graph capture forbids).
        blend_in_kernel = kernels.resolve_backend(self.backend, z_s, op="noise_blend") == "triton"
        diffusion_in_kernel = all(kernels.resolve_backend(self.backend, z_t, op=op) == "triton"
                                  for op in ("q_sample", "squared_error_mean"))
        blend_seed = diffusion_seed = None
        if self.use_anm and blend_noise is None:
            if blend_in_kernel:
                blend_seed = self._seed(generator, z_s)
            else:
                blend_noise = self._normal(z_s.shape, generator, z_s)
        if diffusion_noise is None:
            if diffusion_in_kernel:
                diffusion_seed = self._seed(generator, z_t)
            else:
                diffusion_noise = self._normal(z_t.shape, generator, z_t)
        if diffusion_t is None:
            device = generator.device if generator is not None else z_t.device
            diffusion_t = torch.randint(0, self.schedule.num_train_timesteps, (batch,), generator=generator,
                                        device=device).to(z_t.device)
        if self.use_anm:
            gamma = self.noise_adapter(z_s)
            x_start = kernels.noise_blend(z_s, gamma.to(z_s.dtype), blend_noise, blend_seed, backend=self.backend)
        else:  # the ablation "without ANM": no adapter and no noise
            gamma = torch.ones(batch, device=z_s.device)
            x_start = z_s
        denoised = self.proj(self.denoise(x_start))

        noisy_target = kernels.q_sample(z_t, diffusion_t, self.alphas_cumprod, diffusion_noise, diffusion_seed,
                                        backend=self.backend)
        diffusion_loss = kernels.squared_error_mean(self.model(noisy_target, diffusion_t), diffusion_noise,
                                                    diffusion_seed, backend=self.backend)
        kd_input, kd_target = denoised, z_t
        if self.feature_norm == "channel":
            kd_input, kd_target = standardize_channels(denoised), standardize_channels(z_t)
        if self.distance == "mse":
            kd_loss = kernels.squared_error_mean(kd_input, kd_target, backend=self.backend)
        else:
            kd_loss = DISTANCES[self.distance](kd_input, kd_target, temperature=self.temperature)
        loss = self.kd_weight * kd_loss + self.diffusion_weight * diffusion_loss + self.ae_weight * ae_loss
        return {"loss": loss, "kd_loss": kd_loss, "diffusion_loss": diffusion_loss, "ae_loss": ae_loss,
                "gamma": gamma, **noise_diagnostics(gamma, z_s, denoised, z_t),
                "denoised": self._from_map(denoised, student_feat), "target": self._from_map(z_t, teacher_feat)}


def load_official_state_dict(head: DiffKDHead, state_dict: dict, prefix: str = "") -> DiffKDHead:
    """Loads a checkpoint of the official DiffKD module into ``head``, strictly.

    Our module tree uses the official names, so the mapping is one-to-one; ``prefix`` strips an outer name
    (e.g. ``"module."`` or ``"diffkd_feat."``).  Missing, unexpected or mis-shaped entries raise a ValueError.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    own = head.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(v.shape)} vs head {tuple(own[k].shape)}"
                        for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if missing or unexpected or mis_shaped:
        def first(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        problems = [f"{label}: {first(items)}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)) if items]
        raise ValueError("the checkpoint does not match this DiffKDHead (check student/teacher channels, "
                         "kernel_size, use_ae/ae_channels, use_anm, or pass prefix=): " + "; ".join(problems))
    head.load_state_dict(state_dict, strict=True)
    return head
