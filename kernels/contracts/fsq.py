"""The contract of the finite scalar quantization ops (``csrc/fsq_ops.cpp``): see
:mod:`pyvae.kernels.contracts`. The numbers every backend shares are here too: the bound's margin
and each dimension's constants (:func:`dim_constants`), which ``csrc/common/fsq_params.h`` computes
the same way for the C++ kernels."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import KERNEL_DTYPES, check_dtype, dtype_name, sizes

EPS = 1e-3  # the plain bound's margin: tanh is scaled to (L - 1)(1 + EPS) / 2, a little past the outer levels
MAX_CODEBOOK = 2**31  # the product of the levels stays below this: indices are int32
NAN_INDEX = -1  # the index of a row with a NaN in z (no code)


class DimConstants(NamedTuple):
    """What the kernels use of one dimension of ``L`` levels (float64 here; float32 in the kernels).

    plain bound:      level = round(tanh(z + shift) * scale - offset) + center
    symmetric bound:  level = floor(scale * (tanh(z + shift) + 1) / 2 + 0.5)
    both:             code = (level - center) / center, index weight ``basis``,
                      d code / dz = (1 - tanh(z + shift)^2) * grad_scale
    """
    shift: float  # atanh(offset / half_l) (plain), 0 (symmetric)
    scale: float  # half_l = (L - 1)(1 + EPS) / 2 (plain), L - 1 (symmetric)
    offset: float  # 0.5 for an even L (plain), else 0
    center: float  # L // 2 (plain), (L - 1) / 2 (symmetric): the level whose code is 0
    grad_scale: float  # half_l / (L // 2) (plain), 1 (symmetric)
    basis: int  # prod(levels[:j]): this dimension's weight in the index


def dim_constants(levels: Sequence[int], preserve_symmetry: bool) -> list[DimConstants]:
    """Each dimension's constants, in float64 (the C++ binding computes the same in double)."""
    constants, basis = [], 1
    for level in levels:
        if preserve_symmetry:
            constants.append(DimConstants(0.0, float(level - 1), 0.0, (level - 1) / 2, 1.0, basis))
        else:
            half_l = (level - 1) * (1 + EPS) / 2
            offset = 0.5 if level % 2 == 0 else 0.0
            half_width = level // 2
            constants.append(DimConstants(math.atanh(offset / half_l), half_l, offset, float(half_width),
                                          half_l / half_width, basis))
        basis *= level
    return constants


def _levels_text(levels: Sequence[int]) -> str:
    """The levels as c10 prints an IntArrayRef: [8, 5, 5, 5]."""
    return "[" + ", ".join(str(int(level)) for level in levels) + "]"


def check_levels(levels: Sequence[int], preserve_symmetry: bool) -> None:
    """ValueError naming ``levels`` unless they are a non-empty list of ints >= 2 (2 only with the
    symmetric bound, whose two codes are -1 and 1: the plain bound has none for it) whose product,
    the codebook's size, is below 2^31."""
    if len(levels) == 0:
        raise ValueError("levels must not be empty")
    if any(level < 2 for level in levels):
        raise ValueError(f"levels must each be >= 2, got {_levels_text(levels)}")
    if not preserve_symmetry and any(level == 2 for level in levels):
        raise ValueError(f"levels of 2 need preserve_symmetry=True, got {_levels_text(levels)}")
    if math.prod(levels) >= MAX_CODEBOOK:
        raise ValueError(f"levels must multiply to less than 2^31 (indices are int32), got {_levels_text(levels)}")


def _check_z(z: torch.Tensor, levels: Sequence[int], dtypes: Sequence[torch.dtype]) -> None:
    if z.dim() == 0 or z.shape[-1] != len(levels):
        raise ValueError(f"z must have len(levels) = {len(levels)} values in its last dim, got shape {sizes(z)}")
    check_dtype(z, "z", dtypes)


def check_fsq_forward(z: torch.Tensor, levels: Sequence[int], preserve_symmetry: bool, want_indices: bool, *,
                      dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_levels(levels, preserve_symmetry)
    _check_z(z, levels, dtypes)


def new_fsq_forward_outputs(z: torch.Tensor, levels: Sequence[int], preserve_symmetry: bool, want_indices: bool
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The codes (z's shape and dtype, contiguous) and, with ``want_indices``, the indices (int32,
    z's shape without its last dim)."""
    codes = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    return codes, [z.new_empty(z.shape[:-1], dtype=torch.int32)] if want_indices else []


def check_fsq_backward(z: torch.Tensor, grad_codes: torch.Tensor, levels: Sequence[int], preserve_symmetry: bool, *,
                       dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    check_levels(levels, preserve_symmetry)
    _check_z(z, levels, dtypes)
    if grad_codes.shape != z.shape:
        raise ValueError(f"grad_codes must have z's shape {sizes(z)}, got {sizes(grad_codes)}")
    if grad_codes.dtype != z.dtype:
        raise TypeError(f"grad_codes must have z's dtype ({dtype_name(z.dtype)}), got {dtype_name(grad_codes.dtype)}")
    if grad_codes.device != z.device:
        raise ValueError(f"grad_codes must be on the device of z ({z.device}), got {grad_codes.device}")


def new_fsq_backward_outputs(z: torch.Tensor, grad_codes: torch.Tensor, levels: Sequence[int],
                             preserve_symmetry: bool) -> torch.Tensor:
    """The gradient to z: z's shape and dtype, contiguous."""
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)
