"""Gaussian latent layer: features -> (mu, logvar) -> fused reparameterize + KL."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.reparam_kl import reparameterize_kl


class GaussianLatentOutput(NamedTuple):
    z: torch.Tensor
    kl: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class GaussianLatent(nn.Module):
    """A linear head producing ``mu`` and ``logvar`` followed by :func:`pyvae.reparameterize_kl`.

    One ``Linear(in_features, 2 * latent_dim)``; mu and logvar are views of its output (no copy:
    the kernels read strided rows). In eval mode ``z = mu`` (the posterior mean) unless
    ``sample_in_eval=True``. ``reduction`` and ``backend`` are passed to the op.
    """

    def __init__(self, in_features: int, latent_dim: int, *, reduction: str = "per_sample",
                 backend: str = "auto", sample_in_eval: bool = False) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.reduction = reduction
        self.backend = backend
        self.sample_in_eval = sample_in_eval
        self.proj = nn.Linear(in_features, 2 * latent_dim)

    def forward(self, h: torch.Tensor, *, n_samples: int = 1, seed: int | None = None) -> GaussianLatentOutput:
        mu, logvar = self.proj(h).chunk(2, dim=-1)
        z, kl = reparameterize_kl(mu, logvar, n_samples=n_samples, seed=seed, reduction=self.reduction,
                                  backend=self.backend)
        if not self.training and not self.sample_in_eval:
            z = mu if n_samples == 1 else mu.expand(n_samples, *mu.shape)
        return GaussianLatentOutput(z, kl, mu, logvar)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, reduction={self.reduction!r}, backend={self.backend!r}"
