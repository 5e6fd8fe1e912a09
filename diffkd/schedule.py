"""The DDIM noise schedule of DiffKD (as the official code runs it), with diffusers' semantics.

The ᾱ table is float32, computed exactly as diffusers' DDIMScheduler computes it.  The per-step affine
coefficients (A, B) of the deterministic DDIM step are computed once on the host in float64 from that float32
table and kept as float32: ᾱ is never stored in half precision (ᾱ_0 = 0.9999 rounds to 1.0 in fp16).
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_STARTS = ("official", "paper")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, options))}")


class DDIMSchedule:
    """DDIM schedule: ᾱ table, DiffKD's timestep grids and step coefficients, and a general diffusers step."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, set_alpha_to_one: bool = True):
        _choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            betas = _cosine_betas(num_train_timesteps)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # ᾱ for an index below 0 (the step after t = 0): 1.0 with set_alpha_to_one, as in diffusers.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def __repr__(self) -> str:
        return f"DDIMSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r})"

    # ---- DiffKD's grid -------------------------------------------------------------------------------------
    def _check_num_steps(self, num_steps) -> None:
        limit = self.num_train_timesteps // 2
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= limit:
            raise ValueError(f"inference_steps must be an integer in 1..{limit} (half the {self.num_train_timesteps} "
                             f"training timesteps), got {num_steps!r}")

    def step_pairs(self, num_steps: int, start: str = "official") -> list[tuple[int, int]]:
        """The (t, t_prev) pairs DiffKD's chain evaluates; t_prev < 0 means "ᾱ_prev = final ᾱ" (1.0)."""
        self._check_num_steps(num_steps)
        _choice("timestep_start", start, TIMESTEP_STARTS)
        half = self.num_train_timesteps // 2
        if start == "official":
            # diffusers' "leading" grid for 2N steps, lower half only; each step goes to t − T // (2N).
            ratio = self.num_train_timesteps // (2 * num_steps)
            return [(k * ratio, k * ratio - ratio) for k in range(num_steps - 1, -1, -1)]
        # The paper's reading: start at T/2 and end exactly at t = 0 (ᾱ_0).
        ratio = half // num_steps
        ts = [half - k * ratio for k in range(num_steps)]
        return [(t, ts[i + 1] if i + 1 < num_steps else 0) for i, t in enumerate(ts)]

    def timesteps(self, num_steps: int, start: str = "official") -> torch.Tensor:
        return torch.tensor([t for t, _ in self.step_pairs(num_steps, start)], dtype=torch.long)

    def _alpha_bar_f64(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else float(self.final_alpha_cumprod)

    def step_coefficients(self, num_steps: int, start: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), float32, for x_prev = A_k·x + B_k·ε̂ at every step of DiffKD's chain (computed in float64)."""
        a_list, b_list = [], []
        for t, t_prev in self.step_pairs(num_steps, start):
            ab_t, ab_prev = self._alpha_bar_f64(t), self._alpha_bar_f64(t_prev)
            a_list.append(math.sqrt(ab_prev / ab_t))
            b_list.append(math.sqrt(1 - ab_prev) - math.sqrt(ab_prev * (1 - ab_t) / ab_t))
        return torch.tensor(a_list, dtype=torch.float32), torch.tensor(b_list, dtype=torch.float32)

    # ---- general diffusers DDIM -----------------------------------------------------------------------------
    def inference_timesteps(self, num_steps: int, spacing: str = "leading") -> torch.Tensor:
        """diffusers' ``set_timesteps`` grid (steps_offset 0)."""
        _choice("spacing", spacing, SPACINGS)
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be an integer in 1..{self.num_train_timesteps}, got {num_steps!r}")
        T = self.num_train_timesteps
        if spacing == "leading":
            ratio = T // num_steps
            grid = [i * ratio for i in range(num_steps)]
        elif spacing == "trailing":
            ratio = T / num_steps
            grid = [round(T - i * ratio) - 1 for i in range(num_steps)][::-1]
        else:
            grid = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).round().long().tolist()
        return torch.tensor(grid[::-1], dtype=torch.long)

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, num_steps: int, eta: float = 0.0,
             noise: torch.Tensor | None = None, clip_sample: bool = False, prediction_type: str = "epsilon",
             spacing: str = "leading", clip_sample_range: float = 1.0, use_clipped_model_output: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM step exactly as diffusers' ``DDIMScheduler.step`` (returns ``prev_sample``).

        As in diffusers, the previous timestep is ``t − T // num_steps`` whatever the ``spacing``.
        """
        _choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _choice("spacing", spacing, SPACINGS)
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep must be in 0..{self.num_train_timesteps - 1}, got {t}")
        t_prev = t - self.num_train_timesteps // num_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if prediction_type == "epsilon":
            x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            eps = model_output
        elif prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
        else:
            x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
            eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
        if clip_sample:
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
        std_dev = eta * variance ** 0.5
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
        direction = (1 - alpha_prod_prev - std_dev ** 2) ** 0.5 * eps
        prev_sample = alpha_prod_prev ** 0.5 * x0 + direction
        if eta > 0:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + std_dev * noise
        return prev_sample
