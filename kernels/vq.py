"""Triton nearest-code search: tiles of x against tiles of the codebook through ``tl.dot``, with a
running (min, argmin) per row kept in registers, so the N x K distance matrix never exists.
Registered as ``torch.ops.pyvae.nearest_code_triton``.

Precision (the launcher picks): ``exact`` converts to float32 and uses 3xTF32 (``tf32x3``: each
operand split into two TF32 parts, three tensor-core products, float32-level error; exact for
16-bit inputs, whose mantissas fit one TF32 part); ``fast`` uses plain TF32, or the inputs' own
16-bit tensor-core products when x and the codebook share a 16-bit dtype.

Block sizes: :func:`search_config` (``PYVAE_VQ_TRITON_CONFIG="BLOCK_N,BLOCK_K,BLOCK_D,warps,stages"``
overrides it, for tuning); ``bench/tune_vq_triton.py`` sweeps them on a GPU.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._constants import STATS_CHUNK_ROWS
from ._layout import as_rows, launch_device
from .contracts.vq import (StatsPlan, check_codebook_stats, check_nearest_code, codebook_stats_by_chunks,
                           new_nearest_code_outputs)


@triton.jit
def fold_code_tile(acc, e_sq_ptr, k0, n_codes, best, best_idx, BLOCK_K: tl.constexpr):
    """(best, best_idx) after the codes k0 .. k0 + BLOCK_K of a codebook, given their dot products
    ``acc`` [rows, BLOCK_K] with the rows and their |e|^2 at ``e_sq_ptr``: the running argmin of the
    expanded distance |e|^2 - 2 x.e (also kernels/rvq.py's)."""
    codes = k0 + tl.arange(0, BLOCK_K)
    e_sq = tl.load(e_sq_ptr + codes, mask=codes < n_codes, other=float("inf"))
    dist = e_sq[None, :] - 2.0 * acc
    # a distance that is not finite (NaN, or the -inf of an infinite x or code) never wins, as
    # in csrc/common/vq_math.h
    dist = tl.where((codes[None, :] < n_codes) & (dist > float("-inf")), dist, float("inf"))
    tile_best, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best < best  # strict: ties keep the lower code
    return tl.where(better, tile_best, best), tl.where(better, k0 + tile_arg.to(tl.int64), best_idx)


@triton.jit
def search_rows(x_ptr, x_row_stride, rows, n_rows, e_ptr, e_row_stride, e_sq_ptr, n_codes, dim,
                DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """(best, best_idx, x_sq) of the rows ``rows`` of x (unit column stride) against a codebook: the
    least expanded distance |e|^2 - 2 x.e, its code and |x|^2, BLOCK_D columns per ``tl.dot`` step
    (also the wide-row search of kernels/rvq.py, whose rows are a float32 scratch)."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    # |x|^2 from the x tiles the first code tile loads anyway (no separate pass over x)
    x_sq = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, n_codes, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            xt = tl.load(x_ptr + rows[:, None] * x_row_stride + dd[None, :],
                         mask=(rows[:, None] < n_rows) & (dd[None, :] < dim), other=0.0)
            if k0 == 0:
                xf = xt.to(tl.float32)
                x_sq += tl.sum(xf * xf, axis=1)
            et = tl.load(e_ptr + codes[:, None].to(tl.int64) * e_row_stride + dd[None, :],
                         mask=(codes[:, None] < n_codes) & (dd[None, :] < dim), other=0.0)
            if DOT_FP32:
                acc += tl.dot(xt.to(tl.float32), tl.trans(et.to(tl.float32)), input_precision=INPUT_PRECISION)
            else:
                acc += tl.dot(xt, tl.trans(et))
        best, best_idx = fold_code_tile(acc, e_sq_ptr, k0, n_codes, best, best_idx, BLOCK_K)
    return best, best_idx, x_sq


@triton.jit
def _nearest_code_kernel(x_ptr, e_ptr, e_sq_ptr, idx_ptr, dist_ptr, n_rows, n_codes, dim, x_row_stride,
                         e_row_stride, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    best, best_idx, x_sq = search_rows(x_ptr, x_row_stride, rows, n_rows, e_ptr, e_row_stride, e_sq_ptr, n_codes,
                                       dim, DOT_FP32, INPUT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
    # |x|^2 does not change the argmin, so it is added once at the end; a rounded expansion can dip
    # below 0 for a code equal to x: clamp (NaN passes through: a NaN row keeps its NaN distance).
    dist = best + x_sq
    dist = tl.where(dist < 0.0, 0.0, dist)
    tl.store(idx_ptr + rows, best_idx, mask=rows < n_rows)
    tl.store(dist_ptr + rows, dist, mask=rows < n_rows)


class SearchConfig(NamedTuple):
    block_n: int     # rows of x per program
    block_k: int     # codes per tile of the running argmin
    block_d: int     # dimensions per tl.dot step
    num_warps: int
    num_stages: int


def _config_from_env() -> Optional[SearchConfig]:
    spec = os.environ.get("PYVAE_VQ_TRITON_CONFIG")
    if not spec:
        return None
    try:
        values = [int(v) for v in spec.split(",")]
        config = SearchConfig(*values)
    except (TypeError, ValueError):
        raise ValueError(f"PYVAE_VQ_TRITON_CONFIG must be 'BLOCK_N,BLOCK_K,BLOCK_D,num_warps,num_stages' "
                         f"(powers of two >= 16 for the blocks), got {spec!r}") from None
    if any(b < 16 or b & (b - 1) for b in config[:3]):
        raise ValueError(f"PYVAE_VQ_TRITON_CONFIG: block sizes must be powers of two >= 16, got {spec!r}")
    return config


def search_config(dim: int) -> SearchConfig:
    """Block sizes of the search for rows of ``dim`` values: 64 x 64 tiles, dimensions 16 to 64 per
    ``tl.dot`` step (or ``PYVAE_VQ_TRITON_CONFIG``'s); bench/tune_vq_triton.py measures the
    alternatives."""
    override = _config_from_env()
    if override is not None:
        return override
    return SearchConfig(64, 64, min(max(16, triton.next_power_of_2(dim)), 64), 4, 3)


def launch_search(x2: torch.Tensor, e: torch.Tensor, exact: bool, idx: torch.Tensor, dist: torch.Tensor,
                  config: Optional[SearchConfig] = None) -> None:
    """Runs the search of the [N, D] rows ``x2`` against the [K, D] codebook ``e`` (unit column
    strides) into ``idx`` and ``dist`` ([N] each), with ``config`` or :func:`search_config`'s."""
    n_rows, dim = x2.shape
    n_codes = e.shape[0]
    if n_rows == 0:
        return
    e_sq = e.float().square().sum(1)
    same_16bit = x2.dtype == e.dtype and x2.dtype in (torch.float16, torch.bfloat16)
    # Products of 16-bit values are exact, so "exact" needs no float32 dot for them. Triton's
    # interpreter (CPU tensors) multiplies bfloat16 operands as their raw bits: upcast there.
    interpreted_bf16 = x2.device.type == "cpu" and x2.dtype == torch.bfloat16
    dot_fp32 = not same_16bit or interpreted_bf16
    c = config or search_config(dim)
    with launch_device(x2):
        wrap_triton(_nearest_code_kernel)[(triton.cdiv(n_rows, c.block_n),)](
            x2, e, e_sq, idx, dist, n_rows, n_codes, dim, x2.stride(0), e.stride(0), DOT_FP32=dot_fp32,
            INPUT_PRECISION="tf32x3" if exact else "tf32", BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_D=c.block_d,
            num_warps=c.num_warps, num_stages=c.num_stages)


@triton_op("pyvae::nearest_code_triton", mutates_args=())
def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.nearest_code`` (same schema, checks and outputs)."""
    check_nearest_code(x, codebook, exact)
    dim = codebook.shape[1]
    x2 = as_rows(x, x.numel() // dim if dim else 0, dim)
    e = as_rows(codebook, codebook.shape[0], dim)
    idx, dist = new_nearest_code_outputs(x2, e, exact)  # [N] each
    launch_search(x2, e, exact, idx, dist)
    return idx.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])


# --------------------------------------------------------------------------- per-code statistics


@triton.jit
def _stats_chunk_kernel(x_ptr, order_ptr, starts_ptr, counts_ptr, chunk_end_ptr, chunk_code_ptr, partial_ptr,
                        n_codes, dim, x_row_stride, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of one chunk (<= CHUNK rows, in sorted order) of one code's rows: partial[chunk]."""
    chunk = tl.program_id(0).to(tl.int64)
    code = tl.load(chunk_code_ptr + chunk)
    if code < n_codes:
        count = tl.load(counts_ptr + code)
        n_chunks = (count + CHUNK - 1) // CHUNK
        first = tl.load(starts_ptr + code) + (chunk - (tl.load(chunk_end_ptr + code) - n_chunks)) * CHUNK
        end = tl.load(starts_ptr + code) + count
        pos = first + tl.arange(0, CHUNK)
        rows = tl.load(order_ptr + pos, mask=pos < end, other=0)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tile = tl.load(x_ptr + rows[:, None] * x_row_stride + dd[None, :],
                       mask=(pos[:, None] < end) & (dd[None, :] < dim), other=0.0).to(tl.float32)
        tl.store(partial_ptr + chunk * dim + dd, tl.sum(tile, axis=0), mask=dd < dim)


@triton.jit
def _stats_merge_kernel(partial_ptr, counts_ptr, chunk_end_ptr, sums_ptr, dim, CHUNK: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """sums[code] = its chunks' partial sums added in order."""
    code = tl.program_id(0).to(tl.int64)
    count = tl.load(counts_ptr + code)
    last = tl.load(chunk_end_ptr + code)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in range(last - (count + CHUNK - 1) // CHUNK, last):
        acc += tl.load(partial_ptr + c * dim + dd, mask=dd < dim, other=0.0)
    tl.store(sums_ptr + code * dim + dd, acc, mask=dd < dim)


def _chunk_sums(x2: torch.Tensor, plan: StatsPlan) -> torch.Tensor:
    """The Triton part of codebook_stats: a program per (chunk, BLOCK_D columns) sums the chunk,
    then a program per (code, BLOCK_D columns) adds the code's chunk sums in order."""
    num_codes, dim = plan.counts.shape[0], x2.shape[1]
    partial = x2.new_empty((plan.chunk_code.shape[0], dim), dtype=torch.float32)
    sums = x2.new_empty((num_codes, dim), dtype=torch.float32)
    block_d = min(triton.next_power_of_2(dim), 128)
    d_blocks = triton.cdiv(dim, block_d)
    with launch_device(x2):
        wrap_triton(_stats_chunk_kernel)[(plan.chunk_code.shape[0], d_blocks)](
            x2, plan.order, plan.starts, plan.counts, plan.chunk_end, plan.chunk_code, partial, num_codes, dim,
            x2.stride(0), CHUNK=STATS_CHUNK_ROWS, BLOCK_D=block_d)
        wrap_triton(_stats_merge_kernel)[(num_codes, d_blocks)](
            partial, plan.counts, plan.chunk_end, sums, dim, CHUNK=STATS_CHUNK_ROWS, BLOCK_D=block_d)
    return sums


@triton_op("pyvae::codebook_stats_triton", mutates_args=())
def codebook_stats_triton(x: torch.Tensor, idx: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.codebook_stats``: counts (float32 [K]) and sums (float32
    [K, D]) of the rows of x assigned to each code, deterministic and without host synchronisation
    (the preparation the CUDA backend shares: ``contracts.vq.codebook_stats_by_chunks``)."""
    check_codebook_stats(x, idx, num_codes)
    return codebook_stats_by_chunks(x, idx, num_codes, _chunk_sums)
