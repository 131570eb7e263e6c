"""The contract of the vector quantisation ops (``csrc/vq_ops.cpp``), and the preparation of the
per-code statistics that both GPU backends share: see :mod:`pyvae.kernels.contracts`."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from ..._constants import STATS_CHUNK_ROWS
from .._layout import as_rows
from . import KERNEL_DTYPES, check_dtype, dtype_name, sizes


def check_nearest_code(x: torch.Tensor, codebook: torch.Tensor, exact: bool, *,
                       dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {sizes(codebook)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code (K = 0)")
    if x.dim() < 1 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x must be [..., D] with D = {codebook.shape[1]} (the codebook's), got shape {sizes(x)}")
    if x.device != codebook.device:
        raise ValueError("x and codebook must be on the same device")
    check_dtype(x, "x", dtypes)
    check_dtype(codebook, "codebook", dtypes)


def new_nearest_code_outputs(x: torch.Tensor, codebook: torch.Tensor, exact: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of each row of x (int64) and its squared distance (float32), x's shape without its last dim."""
    return x.new_empty(x.shape[:-1], dtype=torch.int64), x.new_empty(x.shape[:-1], dtype=torch.float32)


def check_codebook_stats(x: torch.Tensor, idx: torch.Tensor, num_codes: int, *,
                         dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    """As the C++ op; the indices' range is left to the scatter of the counts (which refuses an index
    outside [0, num_codes) before any kernel runs), as the CUDA op does: checking it here would read
    them back to the host."""
    if num_codes <= 0:
        raise ValueError(f"num_codes must be positive, got {num_codes}")
    if idx.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {dtype_name(idx.dtype)}")
    check_dtype(x, "x", dtypes)
    if x.dim() < 1 or idx.numel() * x.shape[-1] != x.numel():
        raise ValueError(f"indices must have x's shape without its last dim, got {sizes(idx)} for x {sizes(x)}")
    if idx.device != x.device:
        raise ValueError("indices must be on the device of x")


def new_codebook_stats_outputs(x: torch.Tensor, idx: torch.Tensor, num_codes: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows per code (float32 [K]) and their sums (float32 [K, D])."""
    return x.new_empty(num_codes, dtype=torch.float32), x.new_empty((num_codes, x.shape[-1]), dtype=torch.float32)


def check_codebook_chunk_sums(x: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                              chunk_end: torch.Tensor, chunk_code: torch.Tensor, *,
                              dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_dtype(x, "x", dtypes)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {sizes(x)}")
    if counts.numel() == 0:
        raise ValueError("counts must have an entry per code (K > 0)")
    for name, t in StatsPlan(order, starts, counts, chunk_end, chunk_code)._asdict().items():
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {dtype_name(t.dtype)}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x")
    if order.numel() != x.shape[0]:
        raise ValueError("order must have an entry per row of x")
    if starts.numel() != counts.numel() or chunk_end.numel() != counts.numel():
        raise ValueError("starts and chunk_end must have an entry per code, as counts has")
    if chunk_code.numel() == 0 and x.shape[0] != 0:
        raise ValueError("chunk_code must have an entry per chunk")


def new_codebook_chunk_sums_outputs(x: torch.Tensor, order: torch.Tensor, starts: torch.Tensor,
                                    counts: torch.Tensor, chunk_end: torch.Tensor, chunk_code: torch.Tensor
                                    ) -> torch.Tensor:
    """The sums of each code's rows (float32 [K, D])."""
    return x.new_empty((counts.shape[0], x.shape[1]), dtype=torch.float32)


class StatsPlan(NamedTuple):
    """The rows of x ordered by code and cut into chunks of STATS_CHUNK_ROWS rows, which the GPU
    ``codebook_stats`` kernels sum (``CodebookStatsParams`` in csrc/common/vq_params.h). int64 each."""
    order: torch.Tensor       # [N] the rows, sorted by code (stable: each code's rows in row order)
    starts: torch.Tensor      # [K] where each code's rows begin in order
    counts: torch.Tensor      # [K] rows per code
    chunk_end: torch.Tensor   # [K] inclusive prefix sum of each code's chunk count
    chunk_code: torch.Tensor  # [max_chunks] the code of each chunk (K past the last chunk)


def codebook_stats_by_chunks(x: torch.Tensor, idx: torch.Tensor, num_codes: int,
                             chunk_sums: Callable[[torch.Tensor, StatsPlan], torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``codebook_stats`` of both GPU backends: counts (float32 [K]) and sums (float32 [K, D]) of
    the rows of x assigned to each code, the same bits on every run, without host synchronisation.

    The rows are ordered by code (a stable sort) and each code's rows are cut into chunks, so that a
    code that takes most rows still spreads over many programs; ``chunk_sums(x2, plan)``, the
    backend's kernels, sums each chunk and adds each code's chunk sums in order into [K, D]. There
    are at most K + N / STATS_CHUNK_ROWS chunks, a bound known without reading the counts back.
    Indices outside [0, num_codes) fail the scatter of the counts (on a GPU, its device-side assertion).
    """
    dim = x.shape[-1]
    x2 = as_rows(x, x.numel() // dim if dim else 0, dim)
    flat = idx.reshape(-1)
    n = flat.numel()
    counts = torch.zeros(num_codes, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    if n == 0 or dim == 0:
        return counts.float(), torch.zeros(num_codes, dim, dtype=torch.float32, device=x.device)
    chunk_end = torch.cumsum((counts + STATS_CHUNK_ROWS - 1) // STATS_CHUNK_ROWS, 0)
    # every chunk holds a row, and each code's count rounds up to whole chunks
    max_chunks = min(n, num_codes + (n + STATS_CHUNK_ROWS - 1) // STATS_CHUNK_ROWS)
    plan = StatsPlan(order=torch.sort(flat, stable=True).indices, starts=torch.cumsum(counts, 0) - counts,
                     counts=counts, chunk_end=chunk_end,
                     chunk_code=torch.searchsorted(chunk_end, torch.arange(max_chunks, device=x.device), right=True))
    return counts.float(), chunk_sums(x2, plan)
