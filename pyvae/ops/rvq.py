"""Residual vector quantisation (SoundStream, EnCodec, DAC, RQ-VAE): Q codebooks in sequence, stage
q quantising what stages 0..q-1 left, with all the stages' searches in one call.

Layers of this op family:
    kernels   ``csrc/cpu/rvq.cpp`` (a block of rows through every stage, its residual in cache,
              each stage nearest_code's blocked GEMM search), ``csrc/cuda/rvq.cu`` and
              ``kernels/rvq.py`` (a block of rows through every stage, its residual in shared
              memory / registers);
    ops       ``torch.ops.pyvae.residual_code`` (C++, CPU and CUDA) and its ``_triton`` twin; the
              contract in ``kernels/contracts/rvq.py``;
    autograd  :class:`ResidualVQFunction`: straight-through gradient to x, each stage's
              commitment gradient to x, each stage's codebook gradient (from deterministic per-code
              counts and sums of that stage's residuals, ``codebook_stats``); backward recomputes
              the residuals one stage at a time from x and the indices, so neither direction ever
              holds a residual per stage (``[N, Q, D]``) or a distance matrix (``[N, K]``);
    API       :func:`residual_quantize`, :func:`residual_stats` (per-stage EMA statistics).

**Definition.** ``r_0 = x``; at stage q, ``idx_q`` is the nearest code of ``codebooks[q]`` to ``r_q``
(the rule of :func:`pyvae.nearest_code`: squared L2, ties to the lowest index, a code whose distance
is not finite never wins, so a row with a NaN gets code 0 at every stage, distance NaN), and
``r_{q+1} = r_q - codebooks[q][idx_q]``. The quantized vector is ``sum_q codebooks[q][idx_q]``.
Arithmetic: float32 (float64 on the torch backend for float64 inputs), the residual never rounded to
x's dtype. As vector-quantize-pytorch's ``ResidualVQ``, each stage sees the residual as a constant
of the codebooks before it: a stage's losses send no gradient to earlier codebooks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from ..kernels.contracts import REFERENCE_DTYPES
from ..kernels.contracts import rvq as contract
from ._common import apply, check_floating, check_same_device, reference_vjp
from .vq import PRECISIONS, nearest_code_reference

__all__ = ["residual_quantize", "residual_stats", "ResidualVQResult", "ResidualVQFunction",
           "residual_code_reference", "stage_counts"]

_OP = "rvq"


class ResidualVQResult(NamedTuple):
    """What :func:`residual_quantize` returns (Q stages)."""
    quantized: torch.Tensor          # sum of the chosen codes, straight-through to x; x's shape and dtype
    indices: torch.Tensor            # int64 [..., Q]
    loss: torch.Tensor               # sum over stages of codebook_losses + beta * commitment_losses
    commitment_losses: torch.Tensor  # [Q]: mean((r_q - e_q[idx_q].detach())^2), gradient to x only
    codebook_losses: torch.Tensor    # [Q]: mean((r_q.detach() - e_q[idx_q])^2), gradient to codebooks[q] only
    counts: torch.Tensor             # int64 [Q, K]: assignments per code of each stage
    perplexity: torch.Tensor         # [Q]: exp(entropy of each stage's code frequencies)


def _compute_dtype(x: torch.Tensor, codebooks: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, codebooks.dtype) else torch.float32


# --------------------------------------------------------------------------- the reference
def decode_residuals(x: torch.Tensor, codebooks: torch.Tensor, idx: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist [..., Q], quantized [..., D]) of the indices ``idx`` [..., Q], in plain PyTorch
    (differentiable in x and the codebooks): the op's outputs but the indices, given them."""
    cdt = _compute_dtype(x, codebooks)
    d, stages = codebooks.shape[2], codebooks.shape[0]
    r = x.reshape(-1, d).to(cdt)
    flat = idx.reshape(-1, stages)
    total = torch.zeros_like(r)
    dist = []
    for q in range(stages):
        code = codebooks[q].to(cdt).index_select(0, flat[:, q])
        r = r - code
        total = total + code
        dist.append((r * r).sum(1))
    dist = torch.stack(dist, 1) if dist else r.new_zeros(r.shape[0], 0)
    return dist.reshape(idx.shape), total.to(x.dtype).reshape(x.shape)


def residual_code_reference(x: torch.Tensor, codebooks: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op in plain PyTorch (float64 for float64 inputs, else float32): indices, per-stage
    distances (in the compute dtype) and the quantized sum (x's dtype); the oracle of the tests."""
    cdt = _compute_dtype(x, codebooks)
    d, stages = codebooks.shape[2], codebooks.shape[0]
    r = x.detach().reshape(-1, d).to(cdt)
    indices = []
    for q in range(stages):
        idx_q, _ = nearest_code_reference(r, codebooks[q].detach().to(cdt))
        indices.append(idx_q)
        r = r - codebooks[q].detach().to(cdt).index_select(0, idx_q)
    idx = torch.stack(indices, 1).reshape(*x.shape[:-1], stages)
    dist, quantized = decode_residuals(x, codebooks, idx)
    return idx, dist, quantized


@torch.library.custom_op("pyvae::residual_code_reference", mutates_args=())
def _torch_residual_code(x: torch.Tensor, codebooks: torch.Tensor, exact: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch backend of residual_code, as an opaque op (as nearest_code's: its block loop and
    torch.unique neither compile nor vmap)."""
    contract.check_residual_code(x, codebooks, exact, dtypes=REFERENCE_DTYPES)
    return residual_code_reference(x, codebooks)


@_torch_residual_code.register_fake
def _(x, codebooks, exact):
    contract.check_residual_code(x, codebooks, exact, dtypes=REFERENCE_DTYPES)
    idx, dist, quantized = contract.new_residual_code_outputs(x, codebooks, exact)
    return idx, dist.to(_compute_dtype(x, codebooks)), quantized


# --------------------------------------------------------------------------- per-stage statistics
def stage_counts(idx: torch.Tensor, num_codes: int) -> torch.Tensor:
    """int64 [Q, K]: how many rows each code of each stage took (a scatter-add, no host sync)."""
    stages = idx.shape[-1]
    flat = idx.reshape(-1, stages) + torch.arange(stages, device=idx.device) * num_codes
    flat = flat.reshape(-1)
    # out of place: under vmap the zeros are not batched but the indices are
    return torch.zeros(stages * num_codes, dtype=torch.int64, device=idx.device).scatter_add(
        0, flat, torch.ones_like(flat)).view(stages, num_codes)


def _stats_op(backend: str, differentiable: bool):
    return (backends.op_in_backward if differentiable else backends.plain_op)("vq", "codebook_stats", backend)


def residual_stats(x: torch.Tensor, codebooks: torch.Tensor, idx: torch.Tensor, *, backend: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-stage counts (float32 ``[Q, K]``) and sums of each stage's residuals ``r_q`` (float32
    ``[Q, K, D]``) by code, deterministic, for indices from :func:`residual_quantize`'s own search
    (not checked, so no host synchronisation on a GPU): what an EMA update of each codebook needs.
    The residuals are recomputed from x and the indices one stage at a time."""
    resolved = backends.resolve(backend, x.device, _OP)
    stats = _stats_op(resolved, False)
    k, stages = codebooks.shape[1], codebooks.shape[0]
    cdt = _compute_dtype(x, codebooks)
    with torch.no_grad():
        r = x.reshape(-1, codebooks.shape[2]).to(cdt)
        flat = idx.reshape(-1, stages)
        counts, sums = [], []
        for q in range(stages):
            c, s = stats(r, flat[:, q], k)
            counts.append(c)
            sums.append(s)
            if q + 1 < stages:
                r = r - codebooks[q].to(cdt).index_select(0, flat[:, q])
        return torch.stack(counts), torch.stack(sums)


# --------------------------------------------------------------------------- autograd
class ResidualVQFunction(torch.autograd.Function):
    """``(quantized, idx, codebook_losses, commitment_losses) = ResidualVQFunction.apply(x, codebooks,
    exact, backend)``: the search (``residual_code`` of ``backend``) and the losses of each stage,
    means over x's elements (``[Q]``, float32; float64 for float64 inputs on the torch backend).

    Backward: ``quantized`` passes its gradient straight through to x; stage q's commitment loss
    sends ``2 r_{q+1} / numel`` to x; its codebook loss sends ``2 (count_k e_k - sum_k) / numel`` to
    code k of codebooks[q] (counts and sums of r_q from ``codebook_stats``). Saves x, the codebooks
    and the indices; recomputes each r_q from them in turn. Differentiable again (``create_graph``,
    ``torch.func``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, codebooks, exact: bool, backend: str):
        idx, dist, quantized = backends.plain_op(_OP, "residual_code", backend)(x, codebooks, exact)
        per_stage = dist.reshape(-1, codebooks.shape[0]).sum(0) / max(x.numel(), 1)
        return quantized, idx, per_stage, per_stage.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, codebooks, _, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, codebooks, output[1])
        ctx.backend = backend
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_q, _grad_idx, grad_codebook_losses, grad_commitment_losses):
        x, codebooks, idx = ctx.saved_tensors
        stages, k, d = codebooks.shape
        scale = 2.0 / max(x.numel(), 1)
        cdt = _compute_dtype(x, codebooks)
        want_x = ctx.needs_input_grad[0] and (grad_q is not None or grad_commitment_losses is not None)
        want_codebooks = ctx.needs_input_grad[1] and grad_codebook_losses is not None
        # in place (three [N, D] buffers, the codebooks' gradient written stage by stage into one
        # [Q, K, D] tensor) unless the result must stay differentiable
        in_place = not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                        or torch.compiler.is_compiling())
        grad_x = grad_codebooks = None
        if want_x:
            grad_x = (grad_q.to(cdt).reshape(-1, d) if grad_q is not None
                      else torch.zeros(x.numel() // d if d else 0, d, dtype=cdt, device=x.device))
        if want_codebooks:
            stats = _stats_op(ctx.backend, True)
            grad_codebooks = torch.empty(stages, k, d, dtype=cdt, device=codebooks.device) if in_place else []
        if grad_commitment_losses is not None or want_codebooks:
            # each stage's residual r_q, from x and the codes before it (constants, as in forward)
            flat = idx.reshape(-1, stages)
            e = codebooks.detach().to(cdt)
            r = x.detach().reshape(-1, d).to(cdt, copy=True) if in_place else x.reshape(-1, d).to(cdt)
            if in_place and grad_x is not None and grad_q is not None and grad_x.data_ptr() == grad_q.data_ptr():
                grad_x = grad_x.clone()  # not the caller's gradient: it is accumulated into below
            chosen = torch.empty_like(r) if in_place else None
            for q in range(stages):
                if want_codebooks:
                    counts, sums = stats(r.detach(), flat[:, q], k)
                    weight = grad_codebook_losses[q] * scale
                    if in_place:
                        torch.mul(e[q], counts[:, None], out=grad_codebooks[q]).sub_(sums.to(cdt)).mul_(weight)
                    else:
                        grad_codebooks.append(weight * (counts[:, None] * codebooks[q].to(cdt) - sums.to(cdt)))
                if in_place:
                    r.sub_(torch.index_select(e[q], 0, flat[:, q], out=chosen))
                else:
                    r = r - e[q].index_select(0, flat[:, q])
                if want_x and grad_commitment_losses is not None:
                    weight = grad_commitment_losses[q].to(cdt) * scale
                    grad_x = grad_x.addcmul_(r, weight) if in_place else grad_x + weight * r
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        if grad_codebooks is not None:
            grad_codebooks = (grad_codebooks if in_place else torch.stack(grad_codebooks)).to(codebooks.dtype)
        return grad_x, grad_codebooks, None, None


# --------------------------------------------------------------------------- the op's own derivative
# Registered on the C++ op and its Triton twin: the derivative of dist and quantized given the
# indices the op found (decode_residuals), so exact to any order.
def _code_setup_context(ctx, inputs, output):
    x, codebooks, _ = inputs
    ctx.save_for_backward(x, codebooks, output[0])


def _code_backward(backend: str):
    def backward(ctx, _grad_idx, grad_dist, grad_quantized):
        x, codebooks, idx = ctx.saved_tensors
        grads = reference_vjp(lambda xx, ee: decode_residuals(xx, ee, idx), (x, codebooks), (0, 1),
                              (grad_dist, grad_quantized))
        return grads[0], grads[1], None
    return backward


# --------------------------------------------------------------------------- API
def _check(x, codebooks, backend: str, precision: str) -> str:
    check_floating("x", x, "torch")
    check_floating("codebooks", codebooks, "torch")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be 3-D [Q, K, D], got shape {tuple(codebooks.shape)}")
    if codebooks.shape[0] == 0:
        raise ValueError("codebooks must have at least one stage (Q = 0)")
    if codebooks.shape[1] == 0:
        raise ValueError("codebooks must have at least one code (K = 0)")
    if x.dim() == 0 or x.shape[-1] != codebooks.shape[2]:
        raise ValueError(f"x must be [..., D] with D = {codebooks.shape[2]} (the codebooks'), got shape "
                         f"{tuple(x.shape)}")
    device = check_same_device(x=x, codebooks=codebooks)
    resolved = backends.resolve(backend, device, _OP)
    check_floating("x", x, resolved)
    check_floating("codebooks", codebooks, resolved)
    return resolved


def residual_quantize(x: torch.Tensor, codebooks: torch.Tensor, *, beta: float = 0.25, precision: str = "exact",
                      backend: str = "auto") -> ResidualVQResult:
    """Residual vector quantisation of x through ``codebooks`` (see :class:`ResidualVQResult` and
    the module docstring).

    Args:
        x: ``[..., D]``, float32 / float16 / bfloat16 (float64 on ``backend="torch"``).
        codebooks: ``[Q, K, D]``: Q stages of K codes (a dtype of its own; one codebook shared by
            every stage: ``codebook.expand(Q, K, D)``).
        beta: weight of the commitment losses in ``loss``.
        precision: ``"exact"`` (each stage's chosen code within float32 rounding of the nearest) or
            ``"fast"`` (reduced-precision matrix units where the GPU backends have them).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    ``loss = sum_q codebook_losses[q] + beta * commitment_losses[q]``. Memory: the outputs, plus one
    block of residuals at a time in forward and one ``[N, D]`` residual in backward.
    """
    resolved = _check(x, codebooks, backend, precision)
    quantized, idx, codebook_losses, commitment_losses = apply(
        ResidualVQFunction, x, codebooks, precision == "exact", resolved)
    counts = stage_counts(idx, codebooks.shape[1])
    fractions = counts.to(torch.float32) / max(idx.numel() // max(codebooks.shape[0], 1), 1)
    perplexity = torch.exp(-(fractions * torch.log(fractions.clamp_min(1e-30))).sum(1))
    loss = (codebook_losses + beta * commitment_losses).sum()
    return ResidualVQResult(quantized, idx, loss, commitment_losses, codebook_losses, counts, perplexity)


_FAMILY = backends.load_op_family(_OP, {"residual_code": _torch_residual_code},
                                  derivatives={"residual_code": (_code_setup_context, _code_backward)})
_torch_residual_code.register_autograd(_code_backward("torch"), setup_context=_code_setup_context)
_torch_residual_code.register_vmap(backends.loop_vmap_rule("residual_code_reference"))
