"""Triton kernels of the reconstruction likelihoods, registered as ``torch.ops.pyvae.*_triton``.

Same work split as the CUDA kernels (``csrc/cuda/likelihood.cu``): rows are cut into column blocks
(``LIKELIHOOD_COLUMN_BLOCK`` columns); a program owns BLOCK_R consecutive rows of one block and
walks their columns in BLOCK_C chunks, writing one partial sum per row and block, which the launcher
adds in block order: deterministic, no atomics. A log-variance shared by the batch has its gradient
summed over groups of ``LOGVAR_GROUP_ROWS`` rows in the kernel (one program per group and block).
Both constants are the C++ kernels' (:mod:`pyvae._constants`). The per-element formulas are those of
``csrc/common/likelihood_math.h``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._constants import LIKELIHOOD_COLUMN_BLOCK, LikelihoodFlag
from ._layout import as_rows, launch_device
from .contracts.likelihood import (LOSSES, check_likelihood_forward, check_scale_grad_, logvar_group_rows,
                                   new_likelihood_forward_outputs)

LOSS_IDS = {name: i for i, name in enumerate(LOSSES)}  # the LOSS constexpr of _terms


@triton.jit
def _log1p(x):
    u = 1.0 + x
    corrected = tl.log(tl.where(u == 1.0, 1.0, u)) + (x - (u - 1.0)) / u
    return tl.where(u == 1.0, x, corrected)


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, r, e * r)


@triton.jit
def _limit_coefficient(l, t):
    """c of c l + log1p(e^-|l|) = softplus(l) - t l: 1 - t for l > 0, -t else (likelihood_math.h)."""
    return tl.where(l > 0.0, 1.0, 0.0) - t


@triton.jit
def _limit_product(c, l):
    """c l, but 0 for c = 0: at l = ±inf the limit of the Bernoulli NLL (0 * inf would be NaN)."""
    return tl.where(c == 0.0, 0.0, c * l)


@triton.jit
def _cb_limit_product(c, l):
    """c l for the continuous Bernoulli: for c = 0, 0 at finite l and -inf (the limit of -log|l|) at ±inf."""
    return tl.where(c == 0.0, tl.where(tl.abs(l) == float("inf"), -float("inf"), 0.0), c * l)


@triton.jit
def _cb_log1p_exp_minus_log_norm(l):
    """log1p(e^-|l|) - log C(l): series below |l| = 0.25, else log1p(-e^-|l|) - log|l|; finite at ±inf
    (log|l| of at most the largest float), where _cb_limit_product decides."""
    a = tl.abs(l)
    z = l * l
    series = 0.6931471805599453 + z * (1.0 / 12.0 + z * (-7.0 / 1440.0 + z * (31.0 / 90720.0)))
    e = tl.exp(-a)
    direct = _log1p(-e) - tl.log(tl.minimum(a, 3.4028234663852886e38))  # discarded below 0.25 (a may be 0)
    return tl.where(a < 0.25, _log1p(e) - series, direct)


@triton.jit
def _cb_log_norm_grad(l):
    a = tl.abs(l)
    z = l * l
    series = l * (1.0 / 6.0 + z * (-7.0 / 360.0 + z * (31.0 / 15120.0)))
    e = tl.exp(-a)
    inv_sinh_a = 2.0 * e / (1.0 - e * e)
    direct = 1.0 / tl.where(a < 0.25, 1.0, l) - tl.where(l > 0.0, inv_sinh_a, -inv_sinh_a)
    return tl.where(a < 0.25, series, direct)


@triton.jit
def _terms(p, t, v, LOSS: tl.constexpr):
    """(value without constant, d/dpred, d/dtarget, d/dlogvar) of one element."""
    if LOSS == 0:
        value = _limit_product(_limit_coefficient(p, t), p) + _log1p(tl.exp(-tl.abs(p)))  # softplus(p) - t p
        d_pred = _sigmoid(p) - t
        d_target = -p
        d_logvar = tl.zeros_like(p)
    elif LOSS == 1:
        inv_var = tl.exp(-v)
        diff = p - t
        scaled = diff * inv_var
        # v = -inf: the variance is 0, as for every v below -88.7 (inv_var = inf): +inf where t != m
        # (not inf - inf), NaN where t == m
        value = 0.5 * (diff * scaled + tl.where(v < -3.4028234663852886e38, -3.4028234663852886e38, v))
        d_pred = scaled
        d_target = -scaled
        d_logvar = 0.5 * (1.0 - diff * scaled)
    else:
        value = _cb_limit_product(_limit_coefficient(p, t), p) + _cb_log1p_exp_minus_log_norm(p)
        d_pred = _sigmoid(p) - t - _cb_log_norm_grad(p)
        d_target = -p
        d_logvar = tl.zeros_like(p)
    return value, d_pred, d_target, d_logvar


@triton.jit
def _load_inputs(pred_ptr, target_ptr, logvar_ptr, fixed_logvar, row, col, mask, pred_row_stride,
                 target_row_stride, logvar_row_stride, HAS_LOGVAR: tl.constexpr):
    r2 = row[:, None]
    p = tl.load(pred_ptr + r2 * pred_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + r2 * target_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_LOGVAR:
        v = tl.load(logvar_ptr + r2 * logvar_row_stride + col, mask=mask, other=0.0)
    else:
        v = tl.zeros_like(p) + fixed_logvar
    return p, t, v


@triton.jit
def _likelihood_kernel(pred_ptr, target_ptr, logvar_ptr, out_ptr, grad_pred_ptr, grad_target_ptr, grad_logvar_ptr,
                       fixed_logvar, constant, grad_scale, rows, cols, n_blocks, pred_row_stride, target_row_stride,
                       logvar_row_stride, LOSS: tl.constexpr, HAS_LOGVAR: tl.constexpr, PER_ELEMENT: tl.constexpr,
                       PRED_GRAD: tl.constexpr, TARGET_GRAD: tl.constexpr, LOGVAR_GRAD: tl.constexpr,
                       GROUP_LOGVAR: tl.constexpr, COLUMN_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Losses and the asked-for derivatives in one pass (LikelihoodParams in likelihood_params.h).
    A program owns BLOCK_R consecutive rows of one column block (COLUMN_BLOCK columns); with
    GROUP_LOGVAR, BLOCK_R is the row group of the log-variance's gradient, whose column sums it
    writes."""
    tile = tl.program_id(0).to(tl.int64)
    row_tile = tile // n_blocks
    block = tile % n_blocks
    row = row_tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    col_begin = block * COLUMN_BLOCK
    col_end = tl.minimum(col_begin + COLUMN_BLOCK, cols)
    r2 = row[:, None]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, col_end - col_begin, BLOCK_C):
        col = col_begin + c0 + tl.arange(0, BLOCK_C)
        mask = (r2 < rows) & (col[None, :] < col_end)
        p, t, v = _load_inputs(pred_ptr, target_ptr, logvar_ptr, fixed_logvar, row, col[None, :], mask,
                               pred_row_stride, target_row_stride, logvar_row_stride, HAS_LOGVAR)
        value, d_pred, d_target, d_logvar = _terms(p, t, v, LOSS)
        out = r2 * cols + col[None, :]
        value = tl.where(mask, value + constant, 0.0)
        if PER_ELEMENT:
            tl.store(out_ptr + out, value, mask=mask)
        else:
            acc += tl.sum(value, axis=1)
        if PRED_GRAD:
            tl.store(grad_pred_ptr + out, (d_pred * grad_scale).to(grad_pred_ptr.dtype.element_ty), mask=mask)
        if TARGET_GRAD:
            tl.store(grad_target_ptr + out, (d_target * grad_scale).to(grad_target_ptr.dtype.element_ty), mask=mask)
        if LOGVAR_GRAD:
            if GROUP_LOGVAR:
                group_sum = tl.sum(tl.where(mask, d_logvar * grad_scale, 0.0), axis=0)
                tl.store(grad_logvar_ptr + row_tile * cols + col, group_sum, mask=col < col_end)
            else:
                tl.store(grad_logvar_ptr + out, d_logvar * grad_scale, mask=mask)
    if not PER_ELEMENT:
        tl.store(out_ptr + row * n_blocks + block, acc, mask=row < rows)


@triton.jit
def _scale_unless_one_kernel(grad_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """grad *= scale, the scale read on the device: every program returns at once when it is 1."""
    s = tl.load(scale_ptr)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        tl.store(grad_ptr + offs, (g * s).to(grad_ptr.dtype.element_ty), mask=mask)


def _tile(cols: int, group_rows: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): 2048-element tiles, BLOCK_R = the row group when there is one."""
    block_c = min(triton.next_power_of_2(max(1, min(cols, LIKELIHOOD_COLUMN_BLOCK))), 2048 // group_rows)
    return (group_rows if group_rows > 1 else max(1, 2048 // block_c)), block_c


def _prepare(pred, target, logvar):
    rows = pred.shape[0]
    cols = math.prod(pred.shape[1:])
    pred2, target2 = as_rows(pred, rows, cols), as_rows(target, rows, cols)
    if logvar is None or rows == 0:
        return rows, cols, pred2, target2, pred2, 0
    full = logvar.float().expand(pred.shape)
    if full.stride(0) == 0 or rows == 1:  # one row read by all (the gradient's grouping is by shape)
        return rows, cols, pred2, target2, full[0].contiguous().reshape(1, cols), 0
    return rows, cols, pred2, target2, full.contiguous().reshape(rows, cols), cols


@triton_op("pyvae::likelihood_forward_triton", mutates_args=())
def likelihood_forward_triton(loss: str, pred: torch.Tensor, target: torch.Tensor, logvar: Optional[torch.Tensor],
                              fixed_logvar: float, constant: float, flags: int,
                              grad_scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Triton twin of ``torch.ops.pyvae.likelihood_forward`` (same schema, checks and outputs)."""
    check_likelihood_forward(loss, pred, target, logvar, fixed_logvar, constant, flags, grad_scale)
    rows, cols, pred2, target2, logvar2, logvar_row_stride = _prepare(pred, target, logvar)
    n_blocks = max(1, triton.cdiv(cols, LIKELIHOOD_COLUMN_BLOCK))
    per_element = bool(flags & LikelihoodFlag.PER_ELEMENT)
    out, grads = new_likelihood_forward_outputs(loss, pred, target, logvar, fixed_logvar, constant, flags, grad_scale)
    if not per_element:  # one partial sum per row and column block, added below
        out = pred.new_empty((rows, n_blocks), dtype=torch.float32)
    wanted = [bool(flags & bit) for bit in LikelihoodFlag.GRADS]
    # the kernel's pointers: each asked-for gradient, `out` (never written) for the others
    remaining = iter(grads)
    grad_pred, grad_target, grad_logvar = [next(remaining) if want else out for want in wanted]
    group_rows = logvar_group_rows(pred, logvar, flags) if wanted[2] else 1
    if rows > 0 and cols > 0:
        block_r, block_c = _tile(cols, group_rows)
        with launch_device(pred):
            wrap_triton(_likelihood_kernel)[(triton.cdiv(rows, block_r) * n_blocks,)](
                pred2, target2, logvar2, out, grad_pred, grad_target, grad_logvar, fixed_logvar, constant, grad_scale,
                rows, cols, n_blocks, pred2.stride(0), target2.stride(0), logvar_row_stride, LOSS=LOSS_IDS[loss],
                HAS_LOGVAR=logvar is not None, PER_ELEMENT=per_element, PRED_GRAD=wanted[0],
                TARGET_GRAD=wanted[1], LOGVAR_GRAD=wanted[2], GROUP_LOGVAR=group_rows > 1,
                COLUMN_BLOCK=LIKELIHOOD_COLUMN_BLOCK, BLOCK_R=block_r, BLOCK_C=block_c)
    if not per_element:
        out = pred.new_zeros((rows,), dtype=torch.float32) if cols == 0 else (
            out.reshape(rows) if n_blocks == 1 else out.sum(1))
    return out, grads


@triton_op("pyvae::scale_grad_triton_", mutates_args={"grad"})
def scale_grad_triton_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """Triton twin of ``torch.ops.pyvae.scale_grad_``: contiguous ``grad *= scale`` (one float32
    value on grad's device), skipped on the device when the scale is 1."""
    check_scale_grad_(grad, scale)
    n = grad.numel()
    if n:
        block = 4096
        with launch_device(grad):
            wrap_triton(_scale_unless_one_kernel)[(triton.cdiv(n, block),)](grad, scale, n, BLOCK=block)
