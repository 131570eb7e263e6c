"""The contract of the residual vector quantisation op (``csrc/rvq_ops.cpp``): see
:mod:`pyvae.kernels.contracts`.

``residual_code(x [..., D], codebooks [Q, K, D], exact)`` runs Q nearest-code searches in sequence
on one row at a time: stage q searches ``codebooks[q]`` for the residual ``r_q`` (``r_0 = x`` in
float32, ``r_{q+1} = r_q - e_q[idx_q]`` in float32), with the rule of ``nearest_code`` (squared L2,
ties to the lowest index, a distance that is not finite never wins: a row with none keeps code 0).
It returns the indices (int64 ``[..., Q]``), each stage's squared distance ``|r_q - e_q[idx_q]|^2 =
|r_{q+1}|^2`` (float32 ``[..., Q]``, summed from the residual itself, not from the expansion) and
the sum of the chosen codes (added in float32 in stage order, then rounded to x's dtype, ``[..., D]``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import KERNEL_DTYPES, check_dtype, sizes


def check_residual_code(x: torch.Tensor, codebooks: torch.Tensor, exact: bool, *,
                        dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be 3-D [Q, K, D], got shape {sizes(codebooks)}")
    if codebooks.shape[0] == 0:
        raise ValueError("codebooks must have at least one stage (Q = 0)")
    if codebooks.shape[1] == 0:
        raise ValueError("codebooks must have at least one code (K = 0)")
    if x.dim() < 1 or x.shape[-1] != codebooks.shape[2]:
        raise ValueError(f"x must be [..., D] with D = {codebooks.shape[2]} (the codebooks'), got shape {sizes(x)}")
    if x.device != codebooks.device:
        raise ValueError("x and codebooks must be on the same device")
    check_dtype(x, "x", dtypes)
    check_dtype(codebooks, "codebooks", dtypes)


def new_residual_code_outputs(x: torch.Tensor, codebooks: torch.Tensor, exact: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (int64 [..., Q]), per-stage squared distances (float32 [..., Q]) and the quantized
    sum (x's shape and dtype, contiguous)."""
    stages = (*x.shape[:-1], codebooks.shape[0])
    return (x.new_empty(stages, dtype=torch.int64), x.new_empty(stages, dtype=torch.float32),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))
