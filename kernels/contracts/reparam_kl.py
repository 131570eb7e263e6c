"""The contract of the reparameterize + KL ops (``csrc/reparam_kl_ops.cpp``): see
:mod:`pyvae.kernels.contracts`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import KERNEL_DTYPES, broadcasts, check_dtype, dtype_name, float32_values, sizes


def check_mu_logvar(mu: torch.Tensor, logvar: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if mu.dim() < 1:
        raise ValueError("mu must have at least one dimension, got a 0-d tensor")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {sizes(mu)} and {sizes(logvar)}")
    if mu.dtype != logvar.dtype:
        raise TypeError(f"mu and logvar must have the same dtype, got {dtype_name(mu.dtype)} and "
                        f"{dtype_name(logvar.dtype)}")
    check_dtype(mu, "mu", dtypes)
    if mu.device != logvar.device:
        raise ValueError("mu and logvar must be on the same device")


def check_prior(name: str, prior: Optional[torch.Tensor], mu: torch.Tensor) -> None:
    """A prior's mean or log-variance: mu's dtype and device, a shape that broadcasts to mu's."""
    if prior is None:
        return
    if prior.dtype != mu.dtype:
        raise TypeError(f"{name} must have the dtype of mu ({dtype_name(mu.dtype)}), got {dtype_name(prior.dtype)}")
    if prior.device != mu.device:
        raise ValueError(f"{name} must be on the device of mu ({mu.device}), got {prior.device}")
    if not broadcasts(prior, mu):
        raise ValueError(f"{name} of shape {sizes(prior)} does not broadcast to mu's shape {sizes(mu)}")


def check_reparam_kl_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: Optional[int], n_samples: int,
                             kl_per_element: bool, prior_mu: Optional[torch.Tensor] = None,
                             prior_logvar: Optional[torch.Tensor] = None, *,
                             dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_mu_logvar(mu, logvar, dtypes)
    check_prior("prior_mu", prior_mu, mu)
    check_prior("prior_logvar", prior_logvar, mu)
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")


def new_reparam_kl_forward_outputs(mu: torch.Tensor, logvar: torch.Tensor, seed: Optional[int], n_samples: int,
                                   kl_per_element: bool, prior_mu: Optional[torch.Tensor] = None,
                                   prior_logvar: Optional[torch.Tensor] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [n_samples, *mu.shape] in mu's dtype; the KL in float32, per element or summed over the
    last dim; the seed used (int64, 0-d)."""
    z = mu.new_empty((n_samples, *mu.shape))
    kl = mu.new_empty(mu.shape if kl_per_element else mu.shape[:-1], dtype=torch.float32)
    return z, kl, mu.new_empty((), dtype=torch.int64)


def check_reparam_kl_backward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                              grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                              prior_mu: Optional[torch.Tensor] = None, prior_logvar: Optional[torch.Tensor] = None,
                              prior_mu_grad: bool = False, prior_logvar_grad: bool = False, *,
                              dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    # a grad_z or grad_kl of the wrong shape would be read past its end
    check_mu_logvar(mu, logvar, dtypes)
    check_prior("prior_mu", prior_mu, mu)
    check_prior("prior_logvar", prior_logvar, mu)
    check_upstream(seed, grad_z, grad_kl, mu, "mu", mu.shape, True, dtypes)
    if prior_mu_grad and prior_mu is None:
        raise ValueError("prior_mu_grad needs a prior_mu")
    if prior_logvar_grad and prior_logvar is None:
        raise ValueError("prior_logvar_grad needs a prior_logvar")


def check_upstream(seed: torch.Tensor, grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                   ref: torch.Tensor, ref_name: str, latent: torch.Size, samples_dim: bool,
                   dtypes: Sequence[torch.dtype]) -> None:
    """A backward op's key and upstream gradients (backward_params in csrc/reparam_kl_ops.cpp):
    ``ref`` (mu, or the packed ops' params) gives their dtype and device, ``latent`` is z's shape
    for one sample; grad_z has a leading samples dim where ``samples_dim``."""
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed must be a one-element int64 tensor (the seed_used output of forward)")
    if seed.device != ref.device:
        raise ValueError(f"seed must be on the device of {ref_name} ({ref.device}), got {seed.device}")
    if grad_z is not None:
        if samples_dim and (grad_z.dim() != len(latent) + 1 or grad_z.shape[1:] != latent):
            raise ValueError(f"grad_z must have shape [n_samples, *mu.shape], got {sizes(grad_z)}")
        if not samples_dim and grad_z.shape != latent:
            raise ValueError(f"grad_z must have the shape of z, [{', '.join(map(str, latent))}], got {sizes(grad_z)}")
        if grad_z.dtype != ref.dtype:
            raise TypeError(f"grad_z must have the dtype of {ref_name}")
        if grad_z.device != ref.device:
            raise ValueError(f"grad_z must be on the device of {ref_name} ({ref.device}), got {grad_z.device}")
    if grad_kl is not None:
        if grad_kl.shape != latent:
            raise ValueError(f"grad_kl must have the shape of {'mu' if samples_dim else 'z'} (expanded if need be), "
                             f"got {sizes(grad_kl)}")
        if grad_kl.dtype not in float32_values(dtypes):
            raise TypeError("grad_kl must be float32")
        if grad_kl.device != ref.device:
            raise ValueError(f"grad_kl must be on the device of {ref_name} ({ref.device}), got {grad_kl.device}")


def new_reparam_kl_backward_outputs(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                                    grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                                    prior_mu: Optional[torch.Tensor] = None,
                                    prior_logvar: Optional[torch.Tensor] = None, prior_mu_grad: bool = False,
                                    prior_logvar_grad: bool = False
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of mu and logvar (contiguous, mu's dtype), and of each prior tensor in its own
    shape and dtype where asked for (an empty tensor where not)."""
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(mu, memory_format=torch.contiguous_format),
            prior_mu.new_empty(prior_mu.shape) if prior_mu_grad else mu.new_empty(0),
            prior_logvar.new_empty(prior_logvar.shape) if prior_logvar_grad else mu.new_empty(0))


# ------------------------------------------------------------------------------ the packed ops
def check_logvar_bounds(logvar_min: Optional[float], logvar_max: Optional[float]) -> None:
    if (logvar_min is not None and math.isnan(logvar_min)) or (logvar_max is not None and math.isnan(logvar_max)):
        raise ValueError("logvar_min and logvar_max must not be NaN")
    if logvar_min is not None and logvar_max is not None and logvar_min > logvar_max:
        raise ValueError("logvar_min must be <= logvar_max")


def check_params(params: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if params.dim() < 2 or params.shape[-2] != 2:
        raise ValueError(f"params must have shape [..., 2, Z] (mean and log-variance stacked along dim -2), got "
                         f"{sizes(params)}")
    check_dtype(params, "params", dtypes)


def packed_latent_shape(params: torch.Tensor) -> tuple[int, ...]:
    """z's shape for packed ``params`` [..., 2, Z]: [..., Z]."""
    return (*params.shape[:-2], params.shape[-1])


def check_reparam_kl_packed_forward(params: torch.Tensor, seed: Optional[int], kl_per_element: bool,
                                    logvar_min: Optional[float] = None, logvar_max: Optional[float] = None, *,
                                    dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_params(params, dtypes)
    check_logvar_bounds(logvar_min, logvar_max)
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")


def new_reparam_kl_packed_forward_outputs(params: torch.Tensor, seed: Optional[int], kl_per_element: bool,
                                          logvar_min: Optional[float] = None, logvar_max: Optional[float] = None
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [..., Z] in params' dtype; the KL in float32, per element or summed over Z; the seed used."""
    latent = packed_latent_shape(params)
    z = params.new_empty(latent)
    kl = params.new_empty(latent if kl_per_element else latent[:-1], dtype=torch.float32)
    return z, kl, params.new_empty((), dtype=torch.int64)


def check_reparam_kl_packed_backward(params: torch.Tensor, seed: torch.Tensor, grad_z: Optional[torch.Tensor],
                                     grad_kl: Optional[torch.Tensor], logvar_min: Optional[float] = None,
                                     logvar_max: Optional[float] = None, *,
                                     dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_params(params, dtypes)
    check_logvar_bounds(logvar_min, logvar_max)
    check_upstream(seed, grad_z, grad_kl, params, "params", torch.Size(packed_latent_shape(params)), False, dtypes)


def new_reparam_kl_packed_backward_outputs(params: torch.Tensor, seed: torch.Tensor, grad_z: Optional[torch.Tensor],
                                           grad_kl: Optional[torch.Tensor], logvar_min: Optional[float] = None,
                                           logvar_max: Optional[float] = None) -> torch.Tensor:
    """The gradient of params: [..., 2, Z], contiguous, params' dtype."""
    return torch.empty_like(params, memory_format=torch.contiguous_format)
