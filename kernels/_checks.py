"""Input checks of the ``torch.ops.pyvae.*_triton`` ops: the ones ``csrc/*_ops.cpp`` make at the C++
ops' boundary, with the same exception types and messages, so that a direct call of a Triton op with
a wrong device, dtype or shape is refused before any kernel reads memory. (No Triton here, and
nothing of pyvae but the constants it shares with the C++ kernels: kernels/ sits below pyvae.ops in
the data flow.)"""
from __future__ import annotations

from typing import Optional

import torch

from .._constants import LikelihoodFlag

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# c10's names of the dtypes, as the C++ messages print them
_C10_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


def sizes(t: torch.Tensor) -> str:
    """A shape as c10 prints IntArrayRef: [2, 3]."""
    return "[" + ", ".join(map(str, t.shape)) + "]"


def kernel_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def _broadcasts(small: torch.Tensor, big: torch.Tensor) -> bool:
    """at::is_expandable_to(small.sizes(), big.sizes())."""
    return small.dim() <= big.dim() and all(s in (1, b) for s, b in zip(reversed(small.shape), reversed(big.shape)))


# ------------------------------------------------------------------------------ reparam_kl
def check_reparam_inputs(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    if mu.dim() < 1:
        raise ValueError("mu must have at least one dimension, got a 0-d tensor")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {sizes(mu)} and {sizes(logvar)}")
    if mu.dtype != logvar.dtype:
        raise TypeError(f"mu and logvar must have the same dtype, got {dtype_name(mu.dtype)} and "
                        f"{dtype_name(logvar.dtype)}")
    kernel_dtype(mu, "mu")
    if mu.device != logvar.device:
        raise ValueError("mu and logvar must be on the same device")


def check_prior(name: str, prior: Optional[torch.Tensor], mu: torch.Tensor) -> None:
    if prior is None:
        return
    if prior.dtype != mu.dtype:
        raise TypeError(f"{name} must have the dtype of mu ({dtype_name(mu.dtype)}), got {dtype_name(prior.dtype)}")
    if prior.device != mu.device:
        raise ValueError(f"{name} must be on the device of mu ({mu.device}), got {prior.device}")
    if not _broadcasts(prior, mu):
        raise ValueError(f"{name} of shape {sizes(prior)} does not broadcast to mu's shape {sizes(mu)}")


def check_reparam_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: Optional[int], n_samples: int,
                          prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor]) -> None:
    check_reparam_inputs(mu, logvar)
    check_prior("prior_mu", prior_mu, mu)
    check_prior("prior_logvar", prior_logvar, mu)
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")


def check_reparam_backward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                           grad_z: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                           prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor],
                           prior_mu_grad: bool, prior_logvar_grad: bool) -> None:
    check_reparam_inputs(mu, logvar)
    check_prior("prior_mu", prior_mu, mu)
    check_prior("prior_logvar", prior_logvar, mu)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed must be a one-element int64 tensor (the seed_used output of forward)")
    if seed.device != mu.device:
        raise ValueError(f"seed must be on the device of mu ({mu.device}), got {seed.device}")
    if grad_z is not None:
        if grad_z.dim() != mu.dim() + 1 or grad_z.shape[1:] != mu.shape:
            raise ValueError(f"grad_z must have shape [n_samples, *mu.shape], got {sizes(grad_z)}")
        if grad_z.dtype != mu.dtype:
            raise TypeError("grad_z must have the dtype of mu")
        if grad_z.device != mu.device:
            raise ValueError(f"grad_z must be on the device of mu ({mu.device}), got {grad_z.device}")
    if grad_kl is not None:
        if grad_kl.shape != mu.shape:
            raise ValueError(f"grad_kl must have the shape of mu (expanded if need be), got {sizes(grad_kl)}")
        if grad_kl.dtype != torch.float32:
            raise TypeError("grad_kl must be float32")
        if grad_kl.device != mu.device:
            raise ValueError(f"grad_kl must be on the device of mu ({mu.device}), got {grad_kl.device}")
    if prior_mu_grad and prior_mu is None:
        raise ValueError("prior_mu_grad needs a prior_mu")
    if prior_logvar_grad and prior_logvar is None:
        raise ValueError("prior_logvar_grad needs a prior_logvar")


# ------------------------------------------------------------------------------ likelihoods
LOSSES = ("bernoulli", "gaussian", "continuous_bernoulli")


def check_likelihood(loss: str, pred: torch.Tensor, target: torch.Tensor, logvar: Optional[torch.Tensor],
                     flags: int) -> None:
    if pred.dim() < 1:
        raise ValueError("the prediction must have a batch dimension, got a 0-d tensor")
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target must have the same shape, got {sizes(pred)} and {sizes(target)}")
    if pred.device != target.device:
        raise ValueError("prediction and target must be on the same device")
    if flags & ~LikelihoodFlag.ALL:
        raise ValueError(f"flags must be a combination of the likelihood flags ({LikelihoodFlag.ALL} all set), "
                         f"got {flags}")
    if flags & LikelihoodFlag.GRAD_LOGVAR and logvar is None:
        raise ValueError("flags ask for the log-variance's gradient, but logvar is None")
    if loss not in LOSSES:
        raise ValueError(f"loss must be 'bernoulli', 'gaussian' or 'continuous_bernoulli', got '{loss}'")
    kernel_dtype(pred, "prediction")
    kernel_dtype(target, "target")
    if logvar is not None:
        if logvar.device != pred.device:
            raise ValueError("logvar must be on the device of the prediction")
        if not _broadcasts(logvar, pred):
            raise ValueError(f"logvar of shape {sizes(logvar)} does not broadcast to the prediction's shape "
                             f"{sizes(pred)}")


def check_scale_grad(grad: torch.Tensor, scale: torch.Tensor) -> None:
    kernel_dtype(grad, "grad")
    if not grad.is_contiguous():
        raise ValueError("grad must be contiguous")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a single float32 value, got {dtype_name(scale.dtype)} of shape "
                         f"{sizes(scale)}")
    if scale.device != grad.device:
        raise ValueError("scale must be on the device of grad")


# ------------------------------------------------------------------------------ vector quantisation
def check_codebook(x: torch.Tensor, codebook: torch.Tensor) -> None:
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {sizes(codebook)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code (K = 0)")
    if x.dim() < 1 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x must be [..., D] with D = {codebook.shape[1]} (the codebook's), got shape {sizes(x)}")
    if x.device != codebook.device:
        raise ValueError("x and codebook must be on the same device")
    kernel_dtype(x, "x")
    kernel_dtype(codebook, "codebook")


def check_codebook_stats(x: torch.Tensor, idx: torch.Tensor, num_codes: int) -> None:
    """As the C++ op; the indices' range is left to the scatter of the counts (which refuses an index
    outside [0, num_codes) before any kernel runs), as the CUDA op does: checking it here would read
    them back to the host."""
    if num_codes <= 0:
        raise ValueError(f"num_codes must be positive, got {num_codes}")
    if idx.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {dtype_name(idx.dtype)}")
    kernel_dtype(x, "x")
    if x.dim() < 1 or idx.numel() * x.shape[-1] != x.numel():
        raise ValueError(f"indices must have x's shape without its last dim, got {sizes(idx)} for x {sizes(x)}")
    if idx.device != x.device:
        raise ValueError("indices must be on the device of x")
