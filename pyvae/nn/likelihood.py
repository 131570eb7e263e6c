"""Reconstruction likelihood layers: the fused NLLs of pyvae.ops as modules, the Gaussian one with
a learned, fixed or optimal variance, and the discretized mixture of logistics for data on a grid of
levels."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..ops.dmol import (discretized_mix_logistic_mean, discretized_mix_logistic_nll, discretized_mix_logistic_sample,
                        dmol_num_params, quantize)
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


class DiscretizedMixLogistic(nn.Module):
    """``forward(params, target)`` = :func:`pyvae.discretized_mix_logistic_nll` of data in [0, 1]
    on the grid of ``num_classes`` levels ``k / (num_classes - 1)`` (what pyvae's datasets hold:
    8-bit images are 256 levels, the digits 17), so a model's data needs no rescaling.

    ``params``: ``[B, num_params, *positions]`` (channels first, ``num_params = num_mix * (1 + 3 *
    channels)`` for RGB and ``3 * num_mix`` for one channel; :meth:`param_shape`); ``target``:
    ``[B, channels, *positions]``, floats in [0, 1] (a value between levels is scored at the nearest
    one) or integer class indices. ``channels``: 1 or 3. On the CPU the target's range is checked
    (a ValueError names it); on other devices it is not, so that the forward never waits for the
    device (out-of-range values are scored as the nearest level).

    :meth:`sample` draws from the mixture with the fused seeded sampler and :meth:`mean` gives the
    mixture's mean, both in [0, 1].
    """

    def __init__(self, num_mix: int, channels: int, num_classes: int = 256, *, reduction: str = "batchmean",
                 backend: str = "auto") -> None:
        super().__init__()
        if isinstance(num_mix, bool) or not isinstance(num_mix, int) or num_mix < 1:
            raise ValueError(f"num_mix must be a positive int, got {num_mix!r}")
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels must be 1 (grey, audio) or 3 (RGB), got {channels!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (the data's levels), got {num_classes!r}")
        self.num_mix, self.channels, self.num_classes = num_mix, channels, num_classes
        self.reduction, self.backend = reduction, backend

    @property
    def num_params(self) -> int:
        """Parameters per position: ``3 * num_mix`` for one channel, ``10 * num_mix`` for RGB."""
        return dmol_num_params(self.num_mix, self.channels)

    def param_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The parameters' shape (no batch dim) for data of shape ``(channels, *positions)``."""
        if len(data_shape) < 2 or data_shape[0] != self.channels:
            raise ValueError(f"data of shape (channels = {self.channels}, *positions) expected by this "
                             f"DiscretizedMixLogistic, got {tuple(data_shape)}")
        return (self.num_params, *data_shape[1:])

    def forward(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = target * 2.0 - 1.0 if target.is_floating_point() else target
        return discretized_mix_logistic_nll(params, x, num_mix=self.num_mix, num_classes=self.num_classes,
                                            reduction=self.reduction, backend=self.backend,
                                            validate=target.device.type == "cpu")

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The mixture's mean ``[B, channels, *positions]`` in [0, 1] (differentiable; not on the
        grid: a summary to look at)."""
        return (discretized_mix_logistic_mean(params, num_mix=self.num_mix, channels=self.channels) + 1.0) * 0.5

    @torch.no_grad()
    def sample(self, params: torch.Tensor, *, temperature: float = 1.0, seed: Optional[int] = None) -> torch.Tensor:
        """A draw ``[B, channels, *positions]`` on the data's grid of levels (floats in [0, 1],
        ``params``' dtype for floating params), from :func:`pyvae.discretized_mix_logistic_sample`
        with ``seed`` (None: drawn from PyTorch's generator) and ``temperature``."""
        x = discretized_mix_logistic_sample(params, num_mix=self.num_mix, channels=self.channels,
                                            temperature=temperature, seed=seed, backend=self.backend)
        return quantize(x, self.num_classes).to(params.dtype) / (self.num_classes - 1)

    def extra_repr(self) -> str:
        return (f"num_mix={self.num_mix}, channels={self.channels}, num_classes={self.num_classes}, "
                f"reduction={self.reduction!r}")
