"""Compressions of the teacher feature for a DiffKD head: the paper's linear autoencoder and two fixed ones.

The paper (Huang et al., NeurIPS 2023) compresses large teacher features with a linear autoencoder trained
beside the head (:class:`diffkd.modules.LinearAutoencoder`), and its summary leaves open whether other
compressions work as well.  This module adds two that learn nothing during training, at the same latent width:

- ``pca``: the top principal directions of the teacher feature (per spatial position, over channels), fitted
  once on teacher features before training;
- ``random``: a fixed random orthogonal projection (drawn once from ``seed``), after centring with the teacher
  feature's mean, fitted the same way.

Both are ``z = W·(x − μ)`` as a 1×1 convolution whose W and μ are buffers, so checkpoints hold the fit.  Neither
is whitened: like the head without compression, the diffusion sees the teacher feature at its own scale (the
autoencoder's latent goes through BatchNorm instead).  :func:`fit_compressions` fits every unfitted one inside a
model from a few batches; ``python -m diffkd.train --compression pca|random --ae-channels N`` does this on the
first training images before the first step.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPRESSIONS = ("ae", "pca", "random")  # "none" is a head without compression (use_ae=False)
FIT_IMAGES = 1024


class FixedProjection(nn.Module):
    """``z = W·(x − μ)`` on B×C×H×W maps, with W (latent × C) and μ (C) fixed buffers set by :meth:`fit`."""

    def __init__(self, channels: int, latent_channels: int, kind: str, seed: int = 0):
        super().__init__()
        if kind not in ("pca", "random"):
            raise ValueError(f"unknown fixed projection {kind!r}; expected pca or random")
        if not 1 <= latent_channels <= channels:
            raise ValueError(f"a projection keeps 1..{channels} channels (the teacher's), got {latent_channels}")
        self.kind = kind
        weight = torch.zeros(latent_channels, channels)
        if kind == "random":  # orthonormal rows: Q of a seeded Gaussian matrix
            gaussian = torch.randn(channels, latent_channels, generator=torch.Generator().manual_seed(seed))
            weight = torch.linalg.qr(gaussian).Q.T.contiguous()
        self.register_buffer("weight", weight)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("fitted", torch.tensor(False))
        self._sums: list[torch.Tensor] | None = None  # [n, Σx, Σxxᵀ] while collecting (float64)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, channels={self.weight.shape[1]}, latent={self.weight.shape[0]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sums is not None:
            rows = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
            self._sums[0] += rows.shape[0]
            self._sums[1] += rows.sum(0).cpu()
            self._sums[2] += (rows.T @ rows).cpu()
        elif not bool(self.fitted):
            raise RuntimeError(f"the {self.kind} compression of the teacher feature is not fitted: call "
                               f"diffkd.compression.fit_compressions(model, batches) first (the trainer does it "
                               f"on its first training images)")
        centred = x - self.mean.to(x.dtype)[None, :, None, None]
        return F.conv2d(centred, self.weight.to(x.dtype)[:, :, None, None])

    def start_fit(self) -> None:
        channels = self.weight.shape[1]
        self._sums = [torch.zeros((), dtype=torch.float64), torch.zeros(channels, dtype=torch.float64),
                      torch.zeros(channels, channels, dtype=torch.float64)]

    def finish_fit(self) -> None:
        """Sets μ (and, for pca, W) from the features seen since :meth:`start_fit`."""
        n, total, products = self._sums
        self._sums = None
        if n < 2:
            raise ValueError(f"fitting the {self.kind} compression needs at least 2 feature vectors, saw {int(n)}")
        mean = total / n
        self.mean.copy_(mean.to(self.mean.dtype))
        if self.kind == "pca":
            covariance = products / n - torch.outer(mean, mean)
            _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
            top = vectors[:, -self.weight.shape[0]:].flip(1)
            self.weight.copy_(top.T.to(self.weight.dtype))
        self.fitted.fill_(True)


class FixedCompression(nn.Module):
    """The interface of :class:`diffkd.modules.LinearAutoencoder` (``encoder``; forward → (latent,
    reconstruction)) for a fixed projection: it has no decoder, so there is no reconstruction loss."""

    def __init__(self, channels: int, latent_channels: int, kind: str, seed: int = 0):
        super().__init__()
        self.encoder = FixedProjection(channels, latent_channels, kind, seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.encoder(x), None


@torch.no_grad()
def fit_compressions(model: nn.Module, batches: Iterable, *, images: int = FIT_IMAGES) -> int:
    """Fits every unfitted fixed projection in ``model`` on the teacher features of up to ``images`` images of
    ``batches`` ((images, targets) pairs; ``model(images, targets)`` is a Distiller's forward, run in eval mode
    without gradient and without touching the global random state).  Returns the number of images used (0 when
    nothing needed fitting)."""
    projections = [m for m in model.modules() if isinstance(m, FixedProjection) and not bool(m.fitted)]
    if not projections:
        return 0
    was_training, seen = model.training, 0
    device = next(model.parameters()).device
    for projection in projections:
        projection.start_fit()
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch_images, targets, *_ in batches:
                model(batch_images.to(device), targets.to(device) if torch.is_tensor(targets) else targets)
                seen += len(batch_images)
                if seen >= images:
                    break
    finally:
        model.train(was_training)
    if seen == 0:
        for projection in projections:
            projection._sums = None
        raise ValueError("fitting the compression of the teacher feature needs training images: the loader gave none")
    for projection in projections:
        projection.finish_fit()
    return seen
