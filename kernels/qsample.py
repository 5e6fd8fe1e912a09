"""q-sampling with per-sample timesteps, and the squared-error reductions of the DiffKD losses."""
from __future__ import annotations

import torch

from kernels import reference
from kernels._common import resolve_backend


def q_sample(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None,
             seed=None, *, backend: str | None = None) -> torch.Tensor:
    if resolve_backend(backend, z0) == "torch":
        return reference.q_sample(z0, t, alphas_cumprod, noise, seed)
    raise NotImplementedError("triton q_sample: written by the kernels issue")


def squared_error_mean(pred: torch.Tensor, target: torch.Tensor | None = None, seed=None, *,
                       backend: str | None = None) -> torch.Tensor:
    if resolve_backend(backend, pred) == "torch":
        return reference.squared_error_mean(pred, target, seed)
    raise NotImplementedError("triton squared_error_mean: written by the kernels issue")
