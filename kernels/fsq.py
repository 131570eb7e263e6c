"""Triton kernels of finite scalar quantization, registered as ``torch.ops.pyvae.*_triton``.

A program owns BLOCK rows of z; the dimensions are unrolled at compile time (``tl.static_range``)
with each dimension's constants as ``tl.constexpr`` tuples (``kernels/contracts/fsq.py``:
dim_constants, rounded to float32 as the C++ kernels round them), so a set of levels is one compiled
kernel with its constants in the code, and the row's index is summed in registers. The per-element
formulas are those of ``csrc/common/fsq_math.h``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._layout import as_rows, launch_device
from .contracts import fsq as contract
from .contracts.fsq import check_fsq_backward, check_fsq_forward, new_fsq_backward_outputs, new_fsq_forward_outputs

BLOCK = 256  # rows per program
NAN_INDEX = tl.constexpr(contract.NAN_INDEX)


@triton.jit
def _tanh(v):
    """(tanh(v), 1 - tanh(v)^2) from one e = exp(-2|v|) (fsq_tanh)."""
    e = tl.exp(-2.0 * tl.abs(v))
    r = 1.0 / (1.0 + e)
    t = (1.0 - e) * r
    return tl.where(v < 0.0, -t, t), 4.0 * e * r * r


@triton.jit
def _round_half_even(v):
    """torch.round: the nearest integer, ties to even (fsq_round)."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(0.5 * r)) == 1.0
    return tl.where((r - v == 0.5) & odd, r - 1.0, r)


@triton.jit
def _level(t, scale, offset, center, SYMMETRIC: tl.constexpr):
    """The level (an integer as a float, NaN for NaN) of t = tanh(z + shift) (fsq_plain_level,
    fsq_symmetric_level)."""
    if SYMMETRIC:
        return tl.floor(scale * (t + 1.0) * 0.5 + 0.5)
    else:
        return _round_half_even(t * scale - offset) + center


@triton.jit
def _fsq_forward_kernel(z_ptr, codes_ptr, indices_ptr, rows, z_row_stride, SHIFT: tl.constexpr,
                        SCALE: tl.constexpr, OFFSET: tl.constexpr, CENTER: tl.constexpr, BASIS: tl.constexpr,
                        DIMS: tl.constexpr, SYMMETRIC: tl.constexpr, INDICES: tl.constexpr, BLOCK: tl.constexpr):
    """Codes and (INDICES) indices of BLOCK rows (FsqForwardParams)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = row < rows
    index = tl.zeros([BLOCK], tl.uint32)  # wraps where levels off the grid overflow it, as the C++ kernels
    nan = tl.zeros([BLOCK], tl.int1)
    for j in tl.static_range(DIMS):
        z = tl.load(z_ptr + row * z_row_stride + j, mask=mask, other=0.0).to(tl.float32)
        t, _ = _tanh(z + SHIFT[j])
        level = _level(t, SCALE[j], OFFSET[j], CENTER[j], SYMMETRIC)
        code = tl.math.div_rn(level - CENTER[j], tl.full([BLOCK], CENTER[j], tl.float32))
        tl.store(codes_ptr + row * DIMS + j, code.to(codes_ptr.dtype.element_ty), mask=mask)
        if INDICES:
            is_nan = level != level
            nan = nan | is_nan
            # fsq_level_int: 0 for NaN, clamped to the int32 range
            defined = tl.minimum(tl.maximum(tl.where(is_nan, 0.0, level), -2147483648.0), 2147483520.0)
            index += defined.to(tl.int32).to(tl.uint32) * BASIS[j]
    if INDICES:
        tl.store(indices_ptr + row, tl.where(nan, NAN_INDEX, index.to(tl.int32)), mask=mask)


@triton_op("pyvae::fsq_forward_triton", mutates_args=())
def fsq_forward_triton(z: torch.Tensor, levels: list[int], preserve_symmetry: bool, want_indices: bool
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Triton twin of ``torch.ops.pyvae.fsq_forward`` (same schema, checks and outputs)."""
    check_fsq_forward(z, levels, preserve_symmetry, want_indices)
    codes, indices = new_fsq_forward_outputs(z, levels, preserve_symmetry, want_indices)
    dims = len(levels)
    rows = z.numel() // dims
    if rows:
        z_rows = as_rows(z, rows, dims)
        c = _constexprs(levels, preserve_symmetry)
        with launch_device(z):
            wrap_triton(_fsq_forward_kernel)[(triton.cdiv(rows, BLOCK),)](
                z_rows, codes, indices[0] if want_indices else codes, rows, z_rows.stride(0), SHIFT=c["SHIFT"],
                SCALE=c["SCALE"], OFFSET=c["OFFSET"], CENTER=c["CENTER"], BASIS=c["BASIS"], DIMS=dims,
                SYMMETRIC=preserve_symmetry, INDICES=want_indices, BLOCK=BLOCK)
    return codes, indices


@triton.jit
def _fsq_backward_kernel(z_ptr, grad_codes_ptr, grad_z_ptr, rows, z_row_stride, grad_codes_row_stride,
                         SHIFT: tl.constexpr, GRAD_SCALE: tl.constexpr, DIMS: tl.constexpr, BLOCK: tl.constexpr):
    """The straight-through gradient to z of BLOCK rows (FsqBackwardParams; fsq_grad)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = row < rows
    for j in tl.static_range(DIMS):
        z = tl.load(z_ptr + row * z_row_stride + j, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_codes_ptr + row * grad_codes_row_stride + j, mask=mask, other=0.0).to(tl.float32)
        _, slope = _tanh(z + SHIFT[j])
        tl.store(grad_z_ptr + row * DIMS + j, (g * (slope * GRAD_SCALE[j])).to(grad_z_ptr.dtype.element_ty),
                 mask=mask)


@triton_op("pyvae::fsq_backward_triton", mutates_args=())
def fsq_backward_triton(z: torch.Tensor, grad_codes: torch.Tensor, levels: list[int], preserve_symmetry: bool
                        ) -> torch.Tensor:
    """Triton twin of ``torch.ops.pyvae.fsq_backward`` (same schema, checks and outputs)."""
    check_fsq_backward(z, grad_codes, levels, preserve_symmetry)
    grad_z = new_fsq_backward_outputs(z, grad_codes, levels, preserve_symmetry)
    dims = len(levels)
    rows = z.numel() // dims
    if rows:
        z_rows, grad_rows = as_rows(z, rows, dims), as_rows(grad_codes, rows, dims)
        c = _constexprs(levels, preserve_symmetry)
        with launch_device(z):
            wrap_triton(_fsq_backward_kernel)[(triton.cdiv(rows, BLOCK),)](
                z_rows, grad_rows, grad_z, rows, z_rows.stride(0), grad_rows.stride(0), SHIFT=c["SHIFT"],
                GRAD_SCALE=c["GRAD_SCALE"], DIMS=dims, BLOCK=BLOCK)
    return grad_z


def _constexprs(levels: list[int], preserve_symmetry: bool) -> dict:
    """Each dimension's constants as the kernels' constexpr tuples, rounded to float32 (as the C++
    kernels hold them)."""
    columns = zip(*contract.dim_constants(levels, preserve_symmetry))
    named = dict(zip(contract.DimConstants._fields, columns))

    def float32(values):
        return tuple(torch.tensor(values, dtype=torch.float32).tolist())

    return {"SHIFT": float32(named["shift"]), "SCALE": float32(named["scale"]), "OFFSET": float32(named["offset"]),
            "CENTER": float32(named["center"]), "GRAD_SCALE": float32(named["grad_scale"]),
            "BASIS": tuple(named["basis"])}
