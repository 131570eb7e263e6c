"""Gaussian latent layer: features -> (mu, logvar) -> fused reparameterize + KL."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops import check_reduction, reduce_rows
from ..ops.reparam_kl import reparameterize_kl, reparameterize_kl_packed


class GaussianLatentOutput(NamedTuple):
    z: torch.Tensor
    kl: torch.Tensor       # KL(q || prior), reduced by the layer's reduction: what the ELBO reports
    mu: torch.Tensor
    logvar: torch.Tensor
    kl_loss: torch.Tensor  # what to minimise: ``kl`` with the free-bits floor in training mode


class GaussianLatent(nn.Module):
    """A linear head producing ``mu`` and ``logvar`` followed by :func:`pyvae.reparameterize_kl`.

    One ``Linear(in_features, 2 * latent_dim)``; mu and logvar are views of its output (no copy:
    the kernels read strided rows). Against N(0, I) with one sample the draw is
    :func:`pyvae.reparameterize_kl_packed` on the head's output (the same noise for the same seed;
    the head's gradient comes back as one tensor). In eval mode ``z = mu`` (the posterior mean) unless
    ``sample_in_eval=True``. ``reduction`` and ``backend`` are passed to the op.

    ``free_bits`` (nats, 0 = off): the free-bits objective of Kingma et al. (2016), a floor on the
    KL of each latent dimension averaged over the batch. In training mode ``kl_loss`` is
    ``sum_j max(mean_batch KL_j, free_bits)`` spread over the samples (its batch mean is exactly
    that; a dimension under the floor gets no gradient), reduced like ``kl``; ``kl`` itself stays
    the true KL. In eval mode, and with ``free_bits=0``, ``kl_loss`` is ``kl``.
    """

    def __init__(self, in_features: int, latent_dim: int, *, reduction: str = "per_sample",
                 backend: str = "auto", sample_in_eval: bool = False, free_bits: float = 0.0) -> None:
        super().__init__()
        check_reduction(reduction)
        if not free_bits >= 0:
            raise ValueError(f"free_bits must be a number >= 0 (nats per latent dimension), got {free_bits!r}")
        self.latent_dim = latent_dim
        self.reduction = reduction
        self.backend = backend
        self.sample_in_eval = sample_in_eval
        self.free_bits = float(free_bits)
        self.proj = nn.Linear(in_features, 2 * latent_dim)

    def forward(self, h: torch.Tensor, *, prior: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                n_samples: int = 1, seed: int | None = None) -> GaussianLatentOutput:
        """``prior``: ``None`` for N(0, I), or ``(prior_mu, prior_logvar)`` (tensors broadcastable to
        ``[..., latent_dim]``, either may be None) for a Gaussian prior, e.g. the one a hierarchical
        VAE's layer above produces; the KL is then against it (:func:`pyvae.reparameterize_kl`)."""
        params = self.proj(h)
        mu, logvar = params.chunk(2, dim=-1)
        prior_mu = prior_logvar = None
        if prior is not None:
            if not isinstance(prior, (tuple, list)) or len(prior) != 2:
                raise TypeError(f"prior must be None or a pair (prior_mu, prior_logvar), got {type(prior).__name__}")
            prior_mu, prior_logvar = prior
        floor = self.free_bits > 0 and self.training
        reduction = "none" if floor else self.reduction
        if prior_mu is None and prior_logvar is None and n_samples == 1:
            # the packed op on the head's output: the same draw, and its gradient as one tensor
            z, kl = reparameterize_kl_packed(params, dim=-1, seed=seed, reduction=reduction, backend=self.backend)
        else:
            z, kl = reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, n_samples=n_samples,
                                      seed=seed, reduction=reduction, backend=self.backend)
        kl_loss = kl
        if floor:
            kl_loss = self._free_bits_kl(kl)
            kl = self._reduce(kl)
        if not self.training and not self.sample_in_eval:
            z = mu if n_samples == 1 else mu.expand(n_samples, *mu.shape)
        return GaussianLatentOutput(z, kl, mu, logvar, kl_loss)

    def _reduce(self, kl_elements: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return kl_elements
        return reduce_rows(kl_elements.sum(-1), self.reduction, kl_elements.numel())

    def _free_bits_kl(self, kl_elements: torch.Tensor) -> torch.Tensor:
        # Each sample carries the floor where a dimension's batch-mean KL is under it (a constant:
        # no gradient) and its own KL elsewhere, so the batch mean is sum_j max(KL_j, free_bits).
        per_dim = kl_elements.reshape(-1, kl_elements.shape[-1]).mean(0)
        floored = torch.where(per_dim < self.free_bits, torch.full_like(kl_elements, self.free_bits), kl_elements)
        return self._reduce(floored)

    def extra_repr(self) -> str:
        fb = f", free_bits={self.free_bits}" if self.free_bits else ""
        return f"latent_dim={self.latent_dim}, reduction={self.reduction!r}, backend={self.backend!r}{fb}"
