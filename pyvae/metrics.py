"""Evaluation metrics for pyvae's models: the importance-weighted bound on -log p(x), active latent
units, and codebook perplexity. Batched over examples and samples: no Python loop over either
(the batch is only split into chunks to bound memory)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Union

import torch
from torch import nn

from .ops.vq import code_counts, perplexity_of_frequencies

__all__ = ["ACTIVE_THRESHOLD", "active_units", "code_usage", "evaluating", "iwae_nll", "per_example", "perplexity"]

ACTIVE_THRESHOLD = 0.01
"""``Var_x E[z_u | x]`` above which a latent unit counts as active (Burda et al. 2016): the default
threshold of :func:`active_units`."""


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no autograd for the block; the model's mode is restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _chunks(x: torch.Tensor, y: Optional[torch.Tensor], size: int):
    for start in range(0, x.shape[0], size):
        yield x[start:start + size], None if y is None else y[start:start + size]


@torch.no_grad()
def per_example(fn: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], x: torch.Tensor,
                y: Optional[torch.Tensor] = None, *, chunk: int = 512) -> torch.Tensor:
    """``fn(x_chunk, y_chunk)``, a value per example ``[b, ...]``, over ``x`` (and the labels ``y``,
    or None) in chunks of ``chunk`` examples to bound memory, concatenated to ``[B, ...]``; under
    ``torch.no_grad()``, in the model's current mode. An empty ``x`` gives an empty tensor."""
    parts = [fn(xc, yc) for xc, yc in _chunks(x, y, chunk)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def _batch_size(batch_size, default: int) -> int:
    if batch_size is None:
        return default
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    return batch_size


def iwae_nll(model: nn.Module, x: torch.Tensor, k: int = 100, y: Optional[torch.Tensor] = None, *,
             batch_size: Optional[int] = None, seed: Optional[int] = None) -> torch.Tensor:
    """The importance-weighted bound (Burda et al. 2016) on ``-log p(x)``, in nats per example, ``[B]``:

        ``-(logsumexp_i log w_i - log k)``,  ``log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)``

    for ``k`` draws ``z_i ~ q(z|x)``. The weights come from the model's ``log_importance_weights(x,
    k, y, seed=)`` (``[k, B]``), which draws all ``k`` samples per example in one fused call and
    decodes the ``k * B`` of them as one batch. ``k=1`` is the negative ELBO; the bound tightens
    (decreases in expectation) as ``k`` grows.

    ``batch_size``: examples per chunk (default ``max(1, 4096 // k)``, so a chunk decodes about 4096
    samples). ``seed``: the noise of every chunk (None: drawn from PyTorch's generator). The model is
    evaluated in eval mode under ``torch.no_grad()`` and its mode restored.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (importance samples per example), got {k!r}")
    if not callable(getattr(model, "log_importance_weights", None)):
        raise TypeError(f"model must provide log_importance_weights(x, k, y, seed=) (a pyvae model), got "
                        f"{type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"x must be a batch of examples [B, ...], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    size = _batch_size(batch_size, max(1, 4096 // k))
    parts = []
    with evaluating(model):
        for xc, yc in _chunks(x, y, size):
            log_w = model.log_importance_weights(xc, k, yc, seed=seed)
            parts.append(math.log(k) - torch.logsumexp(log_w, dim=0))
    return torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float32)


def active_units(model: nn.Module, x: torch.Tensor, threshold: float = ACTIVE_THRESHOLD,
                 y: Optional[torch.Tensor] = None, *,
                 batch_size: Optional[int] = None,
                 return_variances: bool = False) -> Union[int, tuple[int, torch.Tensor]]:
    """The number of active latent units (Burda et al. 2016): dimensions ``u`` whose posterior mean
    varies over the data, ``Var_x(E_q(z|x)[z_u]) > threshold``.

    Posterior means come from ``model.encode(x, y)`` (``[B, latent_dim]``) in eval mode, in chunks
    of ``batch_size`` examples (default: all). The variance is the sample variance over the ``B``
    examples (B >= 2). With ``return_variances=True`` returns ``(count, variances [latent_dim])``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 2:
        raise ValueError(f"x must be a batch of at least 2 examples [B, ...], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    size = _batch_size(batch_size, x.shape[0])
    with evaluating(model):
        means = [model.encode(xc, yc) for xc, yc in _chunks(x, y, size)]
    mu = torch.cat(means)
    if mu.dim() != 2:
        raise TypeError(f"active_units needs a model whose encode returns posterior means [B, latent_dim]; "
                        f"{type(model).__name__}.encode returned shape {tuple(mu.shape)}")
    variances = mu.double().var(dim=0).float()
    count = int((variances > threshold).sum())
    return (count, variances) if return_variances else count


def _code_frequencies(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if indices.numel() == 0:
        raise ValueError("indices is empty: no codes to count")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"indices must lie in [0, num_codes = {num_codes}), got values in [{lo}, {hi}]")
    return code_counts(indices.reshape(-1), num_codes).double() / indices.numel()


def perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``exp(H)`` of the code frequencies in ``indices`` (any shape, int64 in ``[0, num_codes)``),
    ``H = -sum_k p_k log p_k``: the effective number of codes in use, between 1 (one code) and
    ``num_codes`` (all equally often). A float32 0-d tensor."""
    return perplexity_of_frequencies(_code_frequencies(indices, num_codes)).float()


def code_usage(indices: torch.Tensor, num_codes: int) -> float:
    """The fraction of the ``num_codes`` codes that occur at least once in ``indices``."""
    return float((_code_frequencies(indices, num_codes) > 0).sum()) / num_codes
