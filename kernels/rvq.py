"""Triton residual vector quantisation: one launch runs every stage. A program owns BLOCK_N rows and
takes them through all Q stages in turn; each stage is nearest_code's search (tiles of codes against
the residual through ``tl.dot``, the running (min, argmin) in registers: :func:`fold_code_tile` and
:func:`search_rows` of kernels/vq.py), then the chosen codes are gathered, subtracted from the
residual and added to the running sum of codes. Registered as ``torch.ops.pyvae.residual_code_triton``.

Where the residual lives (:func:`residual_config`):

* ``D <= MAX_RESIDENT_DIM``: in registers, a float32 [BLOCK_N, next_power_of_2(D)] tile, with the
  float32 sum of the chosen codes beside it; x is read once and the outputs written once.
* wider rows: a float32 [N, D] scratch in global memory, each program reading and writing only its
  own rows, BLOCK_D columns at a time (a whole row's tile would not fit registers, nor its tl.dot
  operands shared memory). The sum of the codes is not kept: it is gathered again at the end from
  the indices the program wrote (the same float32 additions in stage order). ``tl.debug_barrier``
  orders the program's threads between a write of the scratch and the reads that follow.

Neither path holds an N x K distance matrix or a residual per stage ([N, Q, D]).

Arithmetic: the residual is float32 whatever x's and the codebooks' dtypes (codes are converted on
load, so Triton's interpreter, which multiplies bfloat16 operands as raw bits, never sees them in
tl.dot), hence every ``tl.dot`` is on float32 operands: ``exact`` takes 3xTF32 (``tf32x3``,
float32-level error), ``fast`` plain TF32. Subtractions and sums are elementwise float32, so the
residuals, and the quantized sum ``0 + c_0 + c_1 + ...``, are bit-identical to the contract's; dist is
the squared norm of each new residual (kernels/contracts/rvq.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._layout import as_rows, launch_device
from .contracts.rvq import check_residual_code, new_residual_code_outputs
from .vq import fold_code_tile, search_rows

MAX_RESIDENT_DIM = 128  # widest row whose residual stays in registers


@triton.jit
def _to_output(v, out_ptr, BF16_BY_HAND: tl.constexpr):
    """float32 -> the output's dtype, to nearest even. Triton's interpreter truncates float32 to
    bfloat16, where a GPU build rounds (cvt.rn): BF16_BY_HAND rounds with integer arithmetic instead,
    so the quantized sum is bit-exact there too."""
    if BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def _residual_code_kernel(x_ptr, e_ptr, e_sq_ptr, idx_ptr, dist_ptr, quantized_ptr, scratch_ptr, n_rows, n_stages,
                          n_codes, dim, x_row_stride, e_stage_stride, e_row_stride, INPUT_PRECISION: tl.constexpr,
                          RESIDENT: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    # a pointer advanced stage by stage: an offset q * e_stage_stride could overflow int32
    stage_ptr = e_ptr
    stage_sq_ptr = e_sq_ptr
    if RESIDENT:
        dd = tl.arange(0, BLOCK_D)
        tile_ok = row_ok[:, None] & (dd[None, :] < dim)
        r = tl.load(x_ptr + rows[:, None] * x_row_stride + dd[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        total = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for q in range(n_stages):
            best = tl.full([BLOCK_N], float("inf"), tl.float32)
            best_idx = tl.zeros([BLOCK_N], tl.int64)
            for k0 in range(0, n_codes, BLOCK_K):
                codes = k0 + tl.arange(0, BLOCK_K)
                et = tl.load(stage_ptr + codes[:, None].to(tl.int64) * e_row_stride + dd[None, :],
                             mask=(codes[:, None] < n_codes) & (dd[None, :] < dim), other=0.0).to(tl.float32)
                acc = tl.dot(r, tl.trans(et), input_precision=INPUT_PRECISION)
                best, best_idx = fold_code_tile(acc, stage_sq_ptr, k0, n_codes, best, best_idx, BLOCK_K)
            code = tl.load(stage_ptr + best_idx[:, None] * e_row_stride + dd[None, :], mask=tile_ok,
                           other=0.0).to(tl.float32)
            r = r - code
            total = total + code
            tl.store(idx_ptr + rows * n_stages + q, best_idx, mask=row_ok)
            tl.store(dist_ptr + rows * n_stages + q, tl.sum(r * r, axis=1), mask=row_ok)
            stage_ptr += e_stage_stride
            stage_sq_ptr += n_codes
        tl.store(quantized_ptr + rows[:, None] * dim + dd[None, :],
                 _to_output(total, quantized_ptr, BF16_BY_HAND), mask=tile_ok)
    else:
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            tile_ok = row_ok[:, None] & (dd[None, :] < dim)
            xt = tl.load(x_ptr + rows[:, None] * x_row_stride + dd[None, :], mask=tile_ok, other=0.0)
            tl.store(scratch_ptr + rows[:, None] * dim + dd[None, :], xt.to(tl.float32), mask=tile_ok)
        tl.debug_barrier()
        for q in range(n_stages):
            best, best_idx, _ = search_rows(scratch_ptr, dim, rows, n_rows, stage_ptr, e_row_stride, stage_sq_ptr,
                                            n_codes, dim, True, INPUT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
            tl.debug_barrier()  # every read of r_q is done before r_{q+1} overwrites it
            sq = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                tile_ok = row_ok[:, None] & (dd[None, :] < dim)
                rt = tl.load(scratch_ptr + rows[:, None] * dim + dd[None, :], mask=tile_ok, other=0.0)
                rt = rt - tl.load(stage_ptr + best_idx[:, None] * e_row_stride + dd[None, :], mask=tile_ok,
                                  other=0.0).to(tl.float32)
                sq += tl.sum(rt * rt, axis=1)
                tl.store(scratch_ptr + rows[:, None] * dim + dd[None, :], rt, mask=tile_ok)
            tl.store(idx_ptr + rows * n_stages + q, best_idx, mask=row_ok)
            tl.store(dist_ptr + rows * n_stages + q, sq, mask=row_ok)
            stage_ptr += e_stage_stride
            stage_sq_ptr += n_codes
            tl.debug_barrier()  # r_{q+1} and idx[:, q] are written before they are read
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            tile_ok = row_ok[:, None] & (dd[None, :] < dim)
            total = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            stage_ptr = e_ptr
            for q in range(n_stages):
                chosen = tl.load(idx_ptr + rows * n_stages + q, mask=row_ok, other=0)
                total += tl.load(stage_ptr + chosen[:, None] * e_row_stride + dd[None, :], mask=tile_ok,
                                 other=0.0).to(tl.float32)
                stage_ptr += e_stage_stride
            tl.store(quantized_ptr + rows[:, None] * dim + dd[None, :],
                     _to_output(total, quantized_ptr, BF16_BY_HAND), mask=tile_ok)


class ResidualConfig(NamedTuple):
    resident: bool   # the residual in registers (else a global scratch, BLOCK_D columns at a time)
    block_n: int     # rows per program
    block_k: int     # codes per tile of the running argmin
    block_d: int     # columns: the whole padded row when resident, else per tl.dot step
    num_warps: int
    num_stages: int


def residual_config(dim: int) -> ResidualConfig:
    """Block sizes for rows of ``dim`` values: resident rows up to MAX_RESIDENT_DIM (16 .. 128
    columns; 32 rows of 128), wider ones through the scratch 32 columns at a time. One software
    pipeline stage and 8 warps from 64 columns on: with the residual and the sum of codes live in
    registers, deeper pipelines or fewer warps spill (sm_90 compiles, tests/triton_gpu_compile.py)."""
    if dim <= MAX_RESIDENT_DIM:
        block_d = max(16, triton.next_power_of_2(dim))
        return ResidualConfig(True, 64 if block_d <= 64 else 32, 64, block_d, 4 if block_d <= 32 else 8, 1)
    return ResidualConfig(False, 64, 64, 32, 8, 1)


def launch_residual_code(x2: torch.Tensor, codebooks: torch.Tensor, exact: bool, idx: torch.Tensor,
                         dist: torch.Tensor, quantized: torch.Tensor) -> None:
    """Runs the residual search of the [N, D] rows ``x2`` (unit column stride) through ``codebooks``
    [Q, K, D] into ``idx`` and ``dist`` ([N, Q]) and ``quantized`` ([N, D]), all contiguous."""
    n_rows, dim = x2.shape
    if n_rows == 0:
        return
    e = codebooks if codebooks.stride(2) == 1 or dim == 1 else codebooks.contiguous()
    e_sq = e.float().square().sum(2).contiguous()  # [Q, K]
    c = residual_config(dim)
    # only the wide-row path needs the scratch residual; the other gets a placeholder pointer
    scratch = dist if c.resident else x2.new_empty((n_rows, dim), dtype=torch.float32)
    with launch_device(x2):
        wrap_triton(_residual_code_kernel)[(triton.cdiv(n_rows, c.block_n),)](
            x2, e, e_sq, idx, dist, quantized, scratch, n_rows, e.shape[0], e.shape[1], dim, x2.stride(0),
            e.stride(0), e.stride(1), INPUT_PRECISION="tf32x3" if exact else "tf32", RESIDENT=c.resident,
            BF16_BY_HAND=quantized.dtype == torch.bfloat16 and quantized.device.type == "cpu",
            BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_D=c.block_d, num_warps=c.num_warps, num_stages=c.num_stages)


@triton_op("pyvae::residual_code_triton", mutates_args=())
def residual_code_triton(x: torch.Tensor, codebooks: torch.Tensor, exact: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.residual_code`` (same schema, checks and outputs)."""
    check_residual_code(x, codebooks, exact)
    idx, dist, quantized = new_residual_code_outputs(x, codebooks, exact)
    stages, dim = codebooks.shape[0], codebooks.shape[2]
    rows = math.prod(x.shape[:-1])  # not numel // D: D may be 0
    launch_residual_code(as_rows(x, rows, dim), codebooks, exact, idx.view(rows, stages), dist.view(rows, stages),
                         quantized.view(rows, dim))
    return idx, dist, quantized
