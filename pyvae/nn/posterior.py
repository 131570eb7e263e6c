"""``pyvae.nn.DiagonalGaussianDistribution``: a drop-in for diffusers' posterior of the same name
(``diffusers.models.autoencoders.vae.DiagonalGaussianDistribution``, 0.42), the encoder output of
Stable Diffusion's ``AutoencoderKL`` and of the video and audio autoencoders that copy it, on
pyvae's fused reparameterize + KL op."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from ..ops.philox import SEED_LIMIT
from ..ops.reparam_kl import reparameterize_kl, reparameterize_kl_packed

__all__ = ["DiagonalGaussianDistribution"]

_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers' clamp of the log-variance
_KL_DIMS = (1, 2, 3)  # diffusers sums the KL over these dims


class DiagonalGaussianDistribution:
    """The Gaussian posterior of a latent-diffusion autoencoder, as diffusers 0.42 defines it:
    ``parameters`` ``[B, 2C, ...]`` split in two along dim 1 into ``mean`` and ``logvar`` (clamped to
    [-30, 20]); ``std = exp(logvar / 2)``, ``var = exp(logvar)``; ``sample(generator=None)``,
    ``mode()``, ``kl(other=None)`` and ``nll(sample, dims=[1, 2, 3])`` with diffusers' shapes, dtypes
    and values (``deterministic=True``: zero std and var, a KL and NLL of ``torch.Tensor([0.0])``).

    What is fused: ``sample()`` draws ``z = mean + std * eps`` and the KL against N(0, I) in one pass
    of pyvae's packed reparameterize + KL op (:func:`pyvae.reparameterize_kl_packed`) on
    ``parameters`` itself: the clamp of the log-variance happens inside the kernel, only
    ``parameters`` and a seed are kept for backward, and backward writes the gradient of
    ``parameters`` as one tensor. ``kl()`` on the same object returns that KL without another pass.
    ``kl(other)`` (another posterior as the prior) is the op's learned-prior form, one pass too.
    ``mean`` (a view of ``parameters``' first half), ``logvar``, ``std`` and ``var`` are computed on
    first access only (diffusers computes them in its constructor); ``logvar`` is ``torch.clamp``'s,
    as there.

    Differences: the noise is the op's counter-based Philox stream, not ``torch.randn``: a
    ``generator`` seeds it (one 63-bit draw from the generator; on a CUDA generator that draw is
    read back to the host), so a seeded generator still gives a reproducible sample, but not
    diffusers' sample. The stream follows the parameters' memory layout: channels-last parameters
    (a CPU convolution's output) draw in channels-last order, so the same values in another layout
    get other (equally distributed) noise; ``z`` and the parameters' gradient keep the layout. The KL is computed in float32 (float64 for float64 parameters) and returned in
    the parameters' dtype; for latents of other ranks than 4 it is summed over dims 1 to 3 as there
    (3-D audio latents: dims 1 and 2).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if not isinstance(parameters, torch.Tensor) or parameters.dim() < 2 or parameters.shape[1] % 2:
            got = tuple(parameters.shape) if isinstance(parameters, torch.Tensor) else type(parameters).__name__
            raise ValueError(f"parameters must be a tensor [B, 2C, ...] (mean and logvar stacked along dim 1), "
                             f"got {got}")
        self.parameters = parameters
        self.deterministic = deterministic
        self._sample_kl: Optional[torch.Tensor] = None  # the KL that sample() computed with its draw
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean, device=parameters.device, dtype=parameters.dtype)

    # diffusers computes these in its constructor; here on first use (sample() and kl() clamp the
    # log-variance inside the fused op and need none of them). Assignable, as diffusers' attributes.
    @functools.cached_property
    def mean(self) -> torch.Tensor:
        return self.parameters.narrow(1, 0, self.parameters.shape[1] // 2)

    @functools.cached_property
    def logvar(self) -> torch.Tensor:
        half = self.parameters.shape[1] // 2
        return torch.clamp(self.parameters.narrow(1, half, half), _LOGVAR_MIN, _LOGVAR_MAX)

    @functools.cached_property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @functools.cached_property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[B, C, ...]`` as ``[B, C * ...]`` (a view for mean and logvar: each example's half
        of ``parameters`` is contiguous when ``parameters`` is)."""
        return t.reshape(t.shape[0], -1)

    def _fused(self, seed: Optional[int], other: Optional["DiagonalGaussianDistribution"] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z in mean's shape, the KL summed as diffusers sums it, in the parameters' dtype).

        Against N(0, I): the packed op on ``parameters`` itself (the clamp inside the kernel, one
        gradient tensor for ``parameters``, nothing but ``parameters`` and the key kept), in its
        memory layout (contiguous or channels-last); against ``other``: the learned-prior form on the
        clamped halves."""
        per_example = self.parameters.dim() <= 4  # dims 1.. are all of diffusers' summed dims
        reduction = "per_sample" if per_example else "none"
        p = self.parameters
        if other is not None:
            z, kl = reparameterize_kl(self._rows(self.mean), self._rows(self.logvar), seed=seed, reduction=reduction,
                                      prior_mu=self._rows(other.mean), prior_logvar=self._rows(other.logvar))
            z = z.view(self.mean.shape)
        elif not p.is_contiguous() and p.movedim(1, -1).is_contiguous():
            # a channels-last encoder output (what a CPU convolution gives): each position's mean and
            # log-variance are adjacent, [..., 2C], read in place; z and the gradient keep that layout,
            # as diffusers' elementwise ops keep it
            z, kl = reparameterize_kl_packed(p.movedim(1, -1), dim=-1, logvar_min=_LOGVAR_MIN, logvar_max=_LOGVAR_MAX,
                                             seed=seed, reduction=reduction)
            z = z.movedim(-1, 1)
            if per_example:  # per position: summed over the positions
                return z, kl.sum(dim=list(range(1, kl.dim()))).to(p.dtype)
            kl = kl.movedim(-1, 1)
        else:
            z, kl = reparameterize_kl_packed(p, dim=1, logvar_min=_LOGVAR_MIN, logvar_max=_LOGVAR_MAX, seed=seed,
                                             reduction=reduction)
        if not per_example:
            kl = kl.view(self.mean.shape).sum(dim=list(_KL_DIMS))
        return z, kl.to(self.parameters.dtype)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps`` in the parameters' dtype and device; the KL of the same pass is kept
        for :meth:`kl`. ``generator`` seeds the noise (see the class docstring)."""
        if self.deterministic:
            return self.mean + self.std * 0
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, SEED_LIMIT, (), generator=generator, device=generator.device))
        z, self._sample_kl = self._fused(seed)
        return z

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || N(0, I)), or KL(self || other), summed over dims 1 to 3: ``[B]`` for 4-D latents."""
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            if self._sample_kl is not None:
                return self._sample_kl
            return self._fused(0)[1]  # the noise does not enter the KL
        return self._fused(0, other)[1]

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """The Gaussian negative log-likelihood of ``sample``, summed over ``dims`` (diffusers' formula)."""
        if self.deterministic:
            return torch.Tensor([0.0])
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var,
                               dim=list(dims))

    def mode(self) -> torch.Tensor:
        return self.mean
