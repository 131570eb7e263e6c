"""Triton nearest-code search: tiles of x against tiles of the codebook through ``tl.dot``, with a
running (min, argmin) per row kept in registers, so the N x K distance matrix never exists.
Registered as ``torch.ops.pyvae.nearest_code_triton``.

Precision (the launcher picks): ``exact`` converts to float32 and uses 3xTF32 (``tf32x3``: each
operand split into two TF32 parts, three tensor-core products, float32-level error; exact for
16-bit inputs, whose mantissas fit one TF32 part); ``fast`` uses plain TF32, or the inputs' own
16-bit tensor-core products when x and the codebook share a 16-bit dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._layout import as_rows


@triton.jit
def _nearest_code_kernel(x_ptr, e_ptr, e_sq_ptr, idx_ptr, dist_ptr, n_rows, n_codes, dim, x_row_stride,
                         e_row_stride, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
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
        e_sq = tl.load(e_sq_ptr + codes, mask=codes < n_codes, other=float("inf"))
        dist = e_sq[None, :] - 2.0 * acc
        dist = tl.where((codes[None, :] < n_codes) & (dist == dist), dist, float("inf"))  # NaN never wins
        tile_best, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: ties keep the lower code
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_arg.to(tl.int64), best_idx)
    # |x|^2 does not change the argmin, so it is added once at the end; a rounded expansion can dip
    # below 0 for a code equal to x: clamp (NaN passes through: a NaN row keeps its NaN distance).
    dist = best + x_sq
    dist = tl.where(dist < 0.0, 0.0, dist)
    tl.store(idx_ptr + rows, best_idx, mask=rows < n_rows)
    tl.store(dist_ptr + rows, dist, mask=rows < n_rows)


@triton_op("pyvae::nearest_code_triton", mutates_args=())
def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.nearest_code`` (same schema and outputs)."""
    dim = codebook.shape[1]
    x2 = as_rows(x, x.numel() // dim if dim else 0, dim)
    e = as_rows(codebook, codebook.shape[0], dim)
    n_rows, n_codes = x2.shape[0], e.shape[0]
    idx = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    dist = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        e_sq = e.float().square().sum(1)
        block_d = min(max(16, triton.next_power_of_2(dim)), 64)
        same_16bit = x2.dtype == e.dtype and x2.dtype in (torch.float16, torch.bfloat16)
        wrap_triton(_nearest_code_kernel)[(triton.cdiv(n_rows, 64),)](
            x2, e, e_sq, idx, dist, n_rows, n_codes, dim, x2.stride(0), e.stride(0), DOT_FP32=exact or not same_16bit,
            INPUT_PRECISION="tf32x3" if exact else "tf32", BLOCK_N=64, BLOCK_K=64, BLOCK_D=block_d)
    return idx.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])
