"""The contract of the reconstruction likelihood ops (``csrc/likelihood_ops.cpp``): see
:mod:`pyvae.kernels.contracts`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._constants import LOGVAR_GROUP_ROWS, LikelihoodFlag
from . import KERNEL_DTYPES, broadcasts, check_dtype, dtype_name, float32_values, sizes

LOSSES = ("bernoulli", "gaussian", "continuous_bernoulli")
"""The ``loss`` argument's values, in the order of the kernels' loss ids."""


def logvar_group_rows(pred: torch.Tensor, logvar: torch.Tensor | None, flags: int) -> int:
    """Rows per partial sum of the log-variance's gradient: LOGVAR_GROUP_ROWS when ``flags`` ask
    for it (GROUP_LOGVAR_GRAD) and logvar is shared by the batch (absent or of size 1 in dim 0, or a
    batch of one), else 1 (per element)."""
    if logvar is None or not flags & LikelihoodFlag.GROUP_LOGVAR_GRAD:
        return 1
    return LOGVAR_GROUP_ROWS if logvar_shared_by_batch(pred, logvar) else 1


def logvar_shared_by_batch(pred: torch.Tensor, logvar: torch.Tensor) -> bool:
    """Whether every row of the batch reads the same log-variances. Decided by shape, not strides
    (an expanded view of a [B, ...] tensor is per-row data), as the C++ op does."""
    return logvar.dim() < pred.dim() or logvar.shape[0] == 1 or pred.shape[0] == 1


def check_likelihood_forward(loss: str, pred: torch.Tensor, target: torch.Tensor, logvar: Optional[torch.Tensor],
                             fixed_logvar: float, constant: float, flags: int, grad_scale: float, *,
                             dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
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
    check_dtype(pred, "prediction", dtypes)
    check_dtype(target, "target", dtypes)
    if logvar is not None:
        if logvar.device != pred.device:
            raise ValueError("logvar must be on the device of the prediction")
        if not broadcasts(logvar, pred):
            raise ValueError(f"logvar of shape {sizes(logvar)} does not broadcast to the prediction's shape "
                             f"{sizes(pred)}")


def new_likelihood_forward_outputs(loss: str, pred: torch.Tensor, target: torch.Tensor,
                                   logvar: Optional[torch.Tensor], fixed_logvar: float, constant: float, flags: int,
                                   grad_scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The negative log-likelihood (float32, per element with PER_ELEMENT, else per row [B]) and
    the derivatives ``flags`` ask for, in the order prediction, target, log-variance. The
    log-variance's is float32 in the prediction's shape, with dim 0 counting row groups (see
    :func:`logvar_group_rows`)."""
    out = pred.new_empty(pred.shape if flags & LikelihoodFlag.PER_ELEMENT else pred.shape[:1], dtype=torch.float32)
    grads = []
    if flags & LikelihoodFlag.GRAD_PRED:
        grads.append(torch.empty_like(pred, memory_format=torch.contiguous_format))
    if flags & LikelihoodFlag.GRAD_TARGET:
        grads.append(torch.empty_like(target, memory_format=torch.contiguous_format))
    if flags & LikelihoodFlag.GRAD_LOGVAR:
        group = logvar_group_rows(pred, logvar, flags)
        grads.append(pred.new_empty((-(-pred.shape[0] // group), *pred.shape[1:]), dtype=torch.float32))
    return out, grads


def check_scale_grad_(grad: torch.Tensor, scale: torch.Tensor, *,
                      dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_dtype(grad, "grad", dtypes)
    if not grad.is_contiguous():
        raise ValueError("grad must be contiguous")
    if scale.numel() != 1 or scale.dtype not in float32_values(dtypes):
        raise ValueError(f"scale must be a single float32 value, got {dtype_name(scale.dtype)} of shape "
                         f"{sizes(scale)}")
    if scale.device != grad.device:
        raise ValueError("scale must be on the device of grad")
