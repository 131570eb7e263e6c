"""Tensor layout helpers of the Triton launchers and of what the GPU backends share before a launch
(no Triton here)."""
from __future__ import annotations

import contextlib

import torch


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
