"""Reconstruction likelihood layers: the fused NLLs of pyvae.ops as modules, the Gaussian one with
a learned, fixed or optimal variance."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from ..ops.likelihood import bernoulli_nll, continuous_bernoulli_nll, gaussian_nll


class BernoulliLikelihood(nn.Module):
    """``forward(logits, target)`` = :func:`pyvae.bernoulli_nll` (default reduction: per-sample NLL,
    averaged over the batch)."""

    def __init__(self, *, reduction: str = "batchmean", backend: str = "auto") -> None:
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bernoulli_nll(logits, target, reduction=self.reduction, backend=self.backend)


class ContinuousBernoulliLikelihood(BernoulliLikelihood):
    """``forward(logits, target)`` = :func:`pyvae.continuous_bernoulli_nll`."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return continuous_bernoulli_nll(logits, target, reduction=self.reduction, backend=self.backend)


class GaussianLikelihood(nn.Module):
    """``forward(mean, target)`` = :func:`pyvae.gaussian_nll` with this layer's variance.

    ``logvar``: ``"learned"`` (a parameter of shape ``logvar_shape``, broadcast to the mean, e.g.
    ``(C, 1, 1)`` for one variance per channel, ``()`` for one overall; initialised to
    ``init_logvar``), ``"optimal"`` (the batch's MSE, sigma-VAE), or a float / ``None`` (fixed, unit).
    """

    def __init__(self, logvar: Union[str, float, None] = "learned", logvar_shape: tuple[int, ...] = (), *,
                 init_logvar: float = 0.0, full: bool = True, reduction: str = "batchmean",
                 backend: str = "auto") -> None:
        super().__init__()
        if logvar == "learned":
            self.logvar = nn.Parameter(torch.full(tuple(logvar_shape), float(init_logvar)))
        elif logvar == "optimal" or logvar is None or isinstance(logvar, (int, float)):
            self.logvar = logvar
        else:
            raise ValueError(f"logvar must be 'learned', 'optimal', a float or None, got {logvar!r}")
        self.full, self.reduction, self.backend = full, reduction, backend

    def forward(self, mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gaussian_nll(mean, target, self.logvar, full=self.full, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        kind = "learned" if isinstance(self.logvar, nn.Parameter) else repr(self.logvar)
        return f"logvar={kind}, full={self.full}, reduction={self.reduction!r}"
