"""Tensor layout helpers shared by the Triton launchers (and the ops' fake kernels: no Triton here)."""
from __future__ import annotations

import contextlib

import torch

LOGVAR_GROUP_ROWS = 16  # == kLogvarGroupRows in csrc/common/likelihood_params.h


def logvar_group_rows(pred: torch.Tensor, logvar: torch.Tensor | None, group_logvar_grad: bool) -> int:
    """Rows per partial sum of the log-variance's gradient: 16 when asked for and logvar is shared
    by the batch (absent or of size 1 in dim 0, or a batch of one), else 1 (per element)."""
    if logvar is None or not group_logvar_grad:
        return 1
    return LOGVAR_GROUP_ROWS if logvar_shared_by_batch(pred, logvar) else 1


def logvar_shared_by_batch(pred: torch.Tensor, logvar: torch.Tensor) -> bool:
    """Whether every row of the batch reads the same log-variances. Decided by shape, not strides
    (an expanded view of a [B, ...] tensor is per-row data), as the C++ op does."""
    return logvar.dim() < pred.dim() or logvar.shape[0] == 1 or pred.shape[0] == 1


def logvar_grad_shape(pred: torch.Tensor, logvar: torch.Tensor, group_logvar_grad: bool) -> tuple[int, ...]:
    """Shape of the likelihood op's grad_logvar output: the prediction's, with dim 0 counting row
    groups (see :func:`logvar_group_rows`)."""
    group = logvar_group_rows(pred, logvar, group_logvar_grad)
    return (-(-pred.shape[0] // group), *pred.shape[1:])


def as_rows(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` as [rows, cols] with unit column stride: a view where the strides allow (e.g. a chunk
    of a wider tensor), else a copy."""
    t2 = t.reshape(rows, cols)
    return t2 if t2.stride(1) == 1 or cols == 1 else t2.contiguous()


def as_rows_broadcast(t: torch.Tensor, shape: torch.Size, rows: int, cols: int) -> torch.Tensor:
    """``t`` broadcast to ``shape`` as [rows, cols], read in place (stride 0 along broadcast dims: a
    [Z] or [1, Z] tensor is one row every row reads), copied only where no such view exists (e.g.
    [A, 1, Z] for [A, B, Z]) or the columns are strided. Column stride 0 or 1 (as the C++ op's
    prior_rows)."""
    t2 = t.expand(shape).reshape(rows, cols)
    return t2 if cols <= 1 or t2.stride(1) in (0, 1) else t2.contiguous()


def launch_device(t: torch.Tensor):
    """Context making ``t``'s GPU the current device: Triton launches on the current device and its
    current stream, whatever device the arguments are on. A no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
