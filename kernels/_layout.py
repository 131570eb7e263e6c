"""Tensor layout helpers shared by the Triton launchers, the ops' fake kernels and the CUDA
``codebook_stats`` (no Triton here). The constants they share with the C++ kernels come from
:mod:`pyvae._constants`."""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from .._constants import LOGVAR_GROUP_ROWS, STATS_CHUNK_ROWS, LikelihoodFlag


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


def new_likelihood_grads(pred: torch.Tensor, target: torch.Tensor, logvar: torch.Tensor | None,
                         flags: int) -> list[torch.Tensor]:
    """The likelihood op's ``grads`` output, uninitialised: the derivatives ``flags`` ask for, in the
    order prediction, target, log-variance. The log-variance's is float32 in the prediction's shape,
    with dim 0 counting row groups (see :func:`logvar_group_rows`)."""
    grads = []
    if flags & LikelihoodFlag.GRAD_PRED:
        grads.append(torch.empty_like(pred, memory_format=torch.contiguous_format))
    if flags & LikelihoodFlag.GRAD_TARGET:
        grads.append(torch.empty_like(target, memory_format=torch.contiguous_format))
    if flags & LikelihoodFlag.GRAD_LOGVAR:
        group = logvar_group_rows(pred, logvar, flags)
        grads.append(pred.new_empty((-(-pred.shape[0] // group), *pred.shape[1:]), dtype=torch.float32))
    return grads


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
