"""Tensor layout helpers shared by the Triton launchers."""
from __future__ import annotations

import torch


def as_rows(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` as [rows, cols] with unit column stride: a view where the strides allow (e.g. a chunk
    of a wider tensor), else a copy."""
    t2 = t.reshape(rows, cols)
    return t2 if t2.stride(1) == 1 or cols == 1 else t2.contiguous()
