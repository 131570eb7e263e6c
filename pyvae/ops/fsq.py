"""Finite scalar quantization (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple"), fused: vector-quantize-pytorch's ``FSQ`` bound, rounding and ``codes_to_indices`` in one
pass, its straight-through backward in another.

Layers of this op family:
    kernels   ``csrc/cpu/fsq.cpp``, ``csrc/cuda/fsq.cu``, ``kernels/fsq.py``; per-element formulas
              in ``csrc/common/fsq_math.h``, each dimension's constants in
              ``csrc/common/fsq_params.h`` (and ``kernels/contracts/fsq.py: dim_constants``);
    ops       ``torch.ops.pyvae.fsq_forward`` (codes and, in the same pass, indices) and
              ``fsq_backward`` (the gradient to z), C++ (CPU and CUDA) with ``_triton`` twins;
              contracts in ``kernels/contracts/fsq.py``;
    autograd  :class:`FSQFunction`: keeps z only (backward recomputes tanh); a backward with
              ``create_graph=True`` differentiates the backward op through its reference, so higher
              orders are exact;
    API       :func:`finite_scalar_quantize`.

**Definition** (vector-quantize-pytorch 1.32, ``FSQ(levels)``, per dimension j of z's last dim, with
L = levels[j]): the plain bound, with ``half_l = (L - 1)(1 + 1e-3) / 2``, ``offset = 0.5`` for an
even L (else 0) and ``shift = atanh(offset / half_l)``, is
``code = round(tanh(z + shift) * half_l - offset) / (L // 2)`` (round half to even); the symmetric
bound (``preserve_symmetry=True``) is ``code = 2 / (L - 1) * floor((L - 1)(tanh(z) + 1) / 2 + 0.5) - 1``.
Each code is one of L values in [-1, 1]; the row's index is ``sum_j level_j * prod(levels[:j])``
with the level ``level_j = code_j * (L // 2) + L // 2`` (plain) or ``(code_j + 1)(L - 1) / 2``
(symmetric), an integer in [0, L) (computed as an integer in the kernels, never rounded back from
the code). The plain bound has no codes for L = 2 (the peer refuses it too): use the symmetric one.
The bound's margin lets values far out reach one level past the grid for L > 1001 (as the peer).

**Gradient** (straight-through: the rounding passes the gradient unchanged), to z only:
``grad_z = grad_codes * (1 - tanh(z + shift)^2) * half_l / (L // 2)`` (plain) or
``grad_codes * (1 - tanh(z)^2)`` (symmetric).

**Numerics.** float32 arithmetic for float32, float16 and bfloat16 z (float64 on the torch backend
for float64 z: the reference the tests compare with); codes in z's dtype, as the peer casts them
back. Each code is written as ``(level - c) / c`` (c = L // 2, or (L - 1) / 2 symmetric): one correctly
rounded division (or a product where that is exact), the same float on every backend. tanh differs
between backends by an ulp or so, and the ``cpu`` forward counts the thresholds on z where the level
steps (computed in float64, for levels up to 16) instead of evaluating tanh, so a z within about 1e-7
(relative) of a rounding boundary may land one level apart on two backends.

**NaN.** A NaN in z gives a NaN code for that value and the index -1 for its row (on every
backend; no index is -1 otherwise). ``+-inf`` are the outer levels (gradient 0).
"""
from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch

from .. import backends
from ..kernels.contracts import REFERENCE_DTYPES
from ..kernels.contracts import fsq as contract
from ._common import apply, check_floating, reference_derivative

__all__ = ["finite_scalar_quantize", "FSQFunction", "fsq_reference", "NAN_INDEX"]

_OP = "fsq"
NAN_INDEX = contract.NAN_INDEX


# --------------------------------------------------------------------------- the reference
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constants(levels: Sequence[int], preserve_symmetry: bool, dtype: torch.dtype, device: torch.device) -> dict:
    """Each dimension's constants (contract.dim_constants) as tensors [d] of ``dtype`` (basis: int64)."""
    columns = list(zip(*contract.dim_constants(levels, preserve_symmetry)))
    named = dict(zip(contract.DimConstants._fields, columns))
    out = {name: torch.tensor(values, dtype=dtype, device=device) for name, values in named.items() if name != "basis"}
    out["basis"] = torch.tensor(named["basis"], dtype=torch.int64, device=device)
    return out


def fsq_reference(z: torch.Tensor, levels: Sequence[int], preserve_symmetry: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, indices) of z [..., len(levels)] as the module docstring defines them, in plain
    PyTorch: codes in float32 (float64 for float64 z), indices int32 [...] (-1 for a row with a NaN).
    The float64 oracle every backend is tested against (no gradient: see :func:`fsq_backward_reference`)."""
    cdt = _compute_dtype(z.dtype)
    c = _constants(levels, preserve_symmetry, cdt, z.device)
    t = torch.tanh(z.to(cdt) + c["shift"])
    if preserve_symmetry:
        level = torch.floor(c["scale"] * (t + 1) * 0.5 + 0.5)
    else:
        level = torch.round(t * c["scale"] - c["offset"]) + c["center"]
    codes = (level - c["center"]) / c["center"]
    nan = level.isnan()
    weighted = torch.where(nan, 0.0, level).to(torch.int64) * c["basis"]
    indices = torch.where(nan.any(-1), NAN_INDEX, weighted.sum(-1)).to(torch.int32)
    return codes, indices


def fsq_backward_reference(z: torch.Tensor, grad_codes: torch.Tensor, levels: Sequence[int],
                           preserve_symmetry: bool = False) -> torch.Tensor:
    """The straight-through gradient to z, ``grad_codes * (1 - tanh(z + shift)^2) * grad_scale``, in
    float32 (float64 for float64 z); differentiable in both tensors (to any order)."""
    cdt = _compute_dtype(z.dtype)
    c = _constants(levels, preserve_symmetry, cdt, z.device)
    t = torch.tanh(z.to(cdt) + c["shift"])
    return grad_codes.to(cdt) * (1 - t * t) * c["grad_scale"]


def _torch_forward(z, levels, preserve_symmetry, want_indices):
    """The torch backend of ``fsq_forward``: its signature and outputs."""
    contract.check_fsq_forward(z, levels, preserve_symmetry, want_indices, dtypes=REFERENCE_DTYPES)
    codes, indices = fsq_reference(z, levels, preserve_symmetry)
    return codes.to(z.dtype), [indices] if want_indices else []


def _torch_backward(z, grad_codes, levels, preserve_symmetry):
    """The torch backend of ``fsq_backward`` (differentiable: the backward op's derivative)."""
    contract.check_fsq_backward(z, grad_codes, levels, preserve_symmetry, dtypes=REFERENCE_DTYPES)
    return fsq_backward_reference(z, grad_codes, levels, preserve_symmetry).to(z.dtype)


# --------------------------------------------------------------------------- autograd
class FSQFunction(torch.autograd.Function):
    """``codes, indices = FSQFunction.apply(z, levels, preserve_symmetry, want_indices, backend)``:
    ``levels`` a tuple of ints, ``backend`` a concrete one; ``indices`` None unless ``want_indices``.
    Keeps z only: backward's one pass recomputes tanh from it. No gradient to the indices."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, levels, preserve_symmetry, want_indices, backend):
        codes, indices = backends.plain_op(_OP, "fsq_forward", backend)(z, list(levels), preserve_symmetry,
                                                                         want_indices)
        return codes, (indices[0] if want_indices else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, levels, preserve_symmetry, _, backend = inputs
        if output[1] is not None:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(z)
        ctx.levels, ctx.preserve_symmetry, ctx.backend = list(levels), preserve_symmetry, backend
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_codes, _grad_indices):
        if grad_codes is None:
            return None, None, None, None, None
        (z,) = ctx.saved_tensors
        grad_z = backends.op_in_backward(_OP, "fsq_backward", ctx.backend)(z, grad_codes.to(z.dtype), ctx.levels,
                                                                          ctx.preserve_symmetry)
        return grad_z, None, None, None, None


# --------------------------------------------------------------------------- the ops' own derivatives
# Registered on the C++ ops and their Triton twins (pyvae.backends.load_op_family): the forward op's
# derivative is the backward op of the same backend; the backward op's, its reference's.
def _forward_op_setup_context(ctx, inputs, output):
    z, levels, preserve_symmetry, _ = inputs
    ctx.save_for_backward(z)
    ctx.levels, ctx.preserve_symmetry = list(levels), preserve_symmetry


def _forward_op_backward(backend: str):
    def backward(ctx, grad_codes, _grad_indices):
        (z,) = ctx.saved_tensors
        if grad_codes is None:
            return None, None, None, None
        grad_z = backends.op_in_backward(_OP, "fsq_backward", backend)(z, grad_codes.to(z.dtype), ctx.levels,
                                                                      ctx.preserve_symmetry)
        return grad_z, None, None, None
    return backward


# --------------------------------------------------------------------------- API
def _checked_levels(levels, preserve_symmetry: bool) -> tuple[int, ...]:
    """``levels`` as a tuple of ints; TypeError / ValueError naming them otherwise (contract.check_levels)."""
    if type(levels) in (tuple, list) and all(type(level) is int for level in levels):
        # the usual call, its checks cached (but not while torch.compile traces: Dynamo warns about,
        # and ignores, a cache wrapper)
        check = _checked_int_levels.__wrapped__ if torch.compiler.is_compiling() else _checked_int_levels
        return check(tuple(levels), preserve_symmetry)
    if isinstance(levels, (str, bytes, torch.Tensor)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels must be a sequence of ints (e.g. [8, 5, 5, 5]), got {type(levels).__name__}")
    if any(isinstance(level, bool) for level in levels):
        raise TypeError(f"levels must be a sequence of ints (e.g. [8, 5, 5, 5]), got {list(levels)!r}")
    try:
        checked = tuple(operator.index(level) for level in levels)
    except TypeError:
        raise TypeError(f"levels must be a sequence of ints (e.g. [8, 5, 5, 5]), got {list(levels)!r}") from None
    contract.check_levels(checked, preserve_symmetry)
    return checked


@functools.lru_cache(maxsize=64)
def _checked_int_levels(levels: tuple[int, ...], preserve_symmetry: bool) -> tuple[int, ...]:
    contract.check_levels(levels, preserve_symmetry)  # raises: nothing is cached
    return levels


def finite_scalar_quantize(z: torch.Tensor, levels: Sequence[int], *, preserve_symmetry: bool = False,
                           return_indices: bool = True, backend: str = "auto"
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Finite scalar quantization of ``z``: ``codes, indices`` as vector-quantize-pytorch's
    ``FSQ(levels)`` gives them (no projection: its ``quantize`` and ``codes_to_indices``).

    Args:
        z: floating tensor ``[..., d]`` with ``d = len(levels)`` (any leading dims, any strides):
            float32, float16 or bfloat16 (float64 on ``backend="torch"``).
        levels: the number of levels of each of the d dimensions, ints >= 2 (2 only with
            ``preserve_symmetry``) whose product, the size of the implicit codebook, is below 2^31.
        preserve_symmetry: the symmetric bound (codes ``2k / (L - 1) - 1``) instead of the plain one.
        return_indices: compute the indices (else ``None`` is returned and nothing is written).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see :mod:`pyvae.backends`).

    Returns:
        ``codes``: z's shape and dtype, each value one of its dimension's L codes in [-1, 1];
        ``indices``: int32, z's shape without its last dim, in [0, prod(levels)), or ``None``.
        The formulas, the gradient (straight-through, to z) and the NaN rule: the module docstring.
    """
    check_floating("z", z, "torch")
    if not isinstance(preserve_symmetry, bool):
        raise TypeError(f"preserve_symmetry must be a bool, got {type(preserve_symmetry).__name__}")
    checked = _checked_levels(levels, preserve_symmetry)
    if z.dim() == 0 or z.shape[-1] != len(checked):
        raise ValueError(f"z must have len(levels) = {len(checked)} values in its last dim, got shape "
                         f"{tuple(z.shape)}")
    resolved = backends.resolve(backend, z.device, _OP)
    check_floating("z", z, resolved)
    return apply(FSQFunction, z, checked, preserve_symmetry, bool(return_indices), resolved)


_FAMILY = backends.load_op_family(
    _OP, {"fsq_forward": _torch_forward, "fsq_backward": _torch_backward},
    derivatives={"fsq_forward": (_forward_op_setup_context, _forward_op_backward),
                 "fsq_backward": reference_derivative(_torch_backward, (0, 1))})
