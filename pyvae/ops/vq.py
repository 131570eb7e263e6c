"""Vector quantisation (VQ-VAE): nearest-code search that never builds the N x K distance matrix,
the straight-through quantised output, the codebook and commitment losses, code usage, and the
per-code statistics of EMA codebook updates.

Layers of this op family:
    kernels   ``csrc/cpu/vq.cpp`` (BLAS GEMM block by block with a running argmin),
              ``csrc/cuda/vq.cu`` (shared-memory float32 tiles, running argmin per thread, shuffle
              merge), ``kernels/vq.py`` (tl.dot tiles with a running argmin in registers);
    ops       ``torch.ops.pyvae.nearest_code`` and ``codebook_stats`` (CPU, CUDA) and their
              ``_triton`` twins, with fake implementations. The GPU statistics sort the rows by code,
              sum fixed chunks of each code's rows (``STATS_CHUNK_ROWS``) in parallel and add each
              code's chunk sums in order: deterministic, balanced when one code takes most rows, no
              host sync. Both GPU backends share that preparation (``kernels/contracts/vq.py``), which is
              why the CUDA ``codebook_stats`` is registered here, around the C++ kernels;
    autograd  :class:`VQFunction`: straight-through gradient to x, commitment gradient to x, and
              the codebook gradient from deterministic per-code counts and sums (no one-hot, no
              scatter with atomics, nothing of size N x K);
    API       :func:`nearest_code`, :func:`vector_quantize`, :func:`codebook_stats`.

The CUDA search uses tensor cores (WMMA: TF32 or 16-bit) for ``precision="fast"`` when x and the
codebook share a dtype, and float32 CUDA cores otherwise.

Distances are squared L2. Ties go to the lowest index. A code whose expanded distance
``|e|^2 - 2 x.e`` is not finite is chosen only when no code has a finite one, and then code 0
(``csrc/common/vq_math.h``): a row of x containing NaN gets index 0 and distance NaN, a row with an
infinite value index 0 and distance inf, on every backend.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import backends
from ..kernels.contracts import REFERENCE_DTYPES
from ..kernels.contracts import vq as contract
from ._common import apply, check_floating, check_same_device

__all__ = ["nearest_code", "vector_quantize", "codebook_stats", "codebook_stats_of_search", "code_counts", "VQResult",
           "VQFunction",
           "nearest_code_reference", "codebook_stats_reference"]

_OP = "vq"
PRECISIONS = ("exact", "fast")
_REFERENCE_ROWS = 1024  # rows of x per block in the reference: memory O(1024 x K), never N x K


class VQResult(NamedTuple):
    """What :func:`vector_quantize` returns."""
    quantized: torch.Tensor        # x + (e[idx] - x).detach(): straight-through, dtype of x
    indices: torch.Tensor          # int64, x.shape[:-1]
    loss: torch.Tensor             # codebook_loss + beta * commitment_loss (float32)
    commitment_loss: torch.Tensor  # mean((x - e[idx].detach())^2), gradient to x only
    codebook_loss: torch.Tensor    # mean((x.detach() - e[idx])^2), gradient to the codebook only
    counts: torch.Tensor           # int64 [K]: assignments per code
    perplexity: torch.Tensor       # exp(entropy of counts / N) (float32)


# --------------------------------------------------------------------------- the reference
def code_counts(flat_idx: torch.Tensor, num_codes: int) -> torch.Tensor:
    """int64 assignments per code. A scatter-add of ones, not torch.bincount, which reads the
    largest index back to the host on a GPU; integer sums are exact, so this is deterministic."""
    return torch.zeros(num_codes, dtype=torch.int64, device=flat_idx.device).scatter_add(
        0, flat_idx, torch.ones_like(flat_idx))


def perplexity_of_frequencies(probs: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of code frequencies (summing to 1, or all 0 for no rows, which gives 1)."""
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-30))).sum())


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes in plain PyTorch (float64 for float64 inputs, else float32), block by block,
    with the native searches' rules: ties to the lowest index, and a code whose expanded distance is
    not finite wins only when none is finite, then code 0 at distance |x|^2 + inf."""
    cdt = torch.float64 if torch.float64 in (x.dtype, codebook.dtype) else torch.float32
    d, k = codebook.shape[1], codebook.shape[0]
    x2 = x.reshape(-1, d).to(cdt)
    e = codebook.to(cdt)
    # Identical codes must tie exactly, but a GEMM may round identical columns differently: search
    # the distinct codes, ordered by the lowest index each stands for, and map back to that index.
    distinct, which = torch.unique(e, dim=0, return_inverse=True)
    first = torch.full((distinct.shape[0],), k, dtype=torch.int64, device=e.device)
    first = first.scatter_reduce(0, which, torch.arange(k, device=e.device), "amin")
    first, order = first.sort()
    distinct = distinct[order]
    e_sq = (distinct * distinct).sum(1)
    # blocks concatenated, not written into a preallocated tensor (which vmap could not batch)
    idx_blocks = [torch.empty(0, dtype=torch.int64, device=x.device)]
    found_blocks = [torch.empty(0, dtype=torch.bool, device=x.device)]
    for r0 in range(0, x2.shape[0], _REFERENCE_ROWS):
        xb = x2[r0:r0 + _REFERENCE_ROWS]
        dist = e_sq - 2.0 * (xb @ distinct.t())
        # the rule of csrc/common/vq_math.h: a distance that is not finite never wins
        dist = torch.where(dist > -math.inf, dist, math.inf)
        best, arg = dist.min(1)  # the first of equal values: the lowest index
        idx_blocks.append(torch.where(best < math.inf, first[arg], 0))
        found_blocks.append(best < math.inf)
    idx, found = torch.cat(idx_blocks), torch.cat(found_blocks)
    dist = torch.where(found, ((x2 - e[idx]) ** 2).sum(1), (x2 * x2).sum(1) + math.inf).float()
    return idx.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])


def codebook_stats_reference(x: torch.Tensor, idx: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and sums in plain PyTorch, deterministic on every device (stable sort, then
    one segment sum per code)."""
    d = x.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    x2 = x.reshape(-1, d).to(cdt)
    flat = idx.reshape(-1)
    counts = code_counts(flat, num_codes).to(cdt)
    order = torch.sort(flat, stable=True).indices
    sums = torch.segment_reduce(x2[order], "sum", lengths=counts.to(torch.int64), axis=0, unsafe=True) \
        if x2.shape[0] else x2.new_zeros(num_codes, d)
    return counts, sums


# --------------------------------------------------------------------------- backends
@torch.library.custom_op("pyvae::nearest_code_reference", mutates_args=())
def _torch_nearest_code(x: torch.Tensor, codebook: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of nearest_code (one precision: float64 for float64 inputs, else float32),
    as an opaque op: traced, its loop over blocks of rows made torch.compile specialise on the row
    count, and its search for identical codes (torch.unique) cannot be vmapped."""
    contract.check_nearest_code(x, codebook, exact, dtypes=REFERENCE_DTYPES)
    return nearest_code_reference(x, codebook)


@_torch_nearest_code.register_fake
def _(x, codebook, exact):
    contract.check_nearest_code(x, codebook, exact, dtypes=REFERENCE_DTYPES)
    return contract.new_nearest_code_outputs(x, codebook, exact)


@torch.library.custom_op("pyvae::codebook_stats_reference", mutates_args=())
def _torch_codebook_stats(x: torch.Tensor, idx: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of codebook_stats, as an opaque op with the derivative of the native ones:
    its segment sum has no rule under vmap (PyTorch would loop, warning)."""
    contract.check_codebook_stats(x, idx, num_codes, dtypes=REFERENCE_DTYPES)
    return codebook_stats_reference(x, idx, num_codes)


@_torch_codebook_stats.register_fake
def _(x, idx, num_codes):
    contract.check_codebook_stats(x, idx, num_codes, dtypes=REFERENCE_DTYPES)
    # float64 for float64 x, as the reference computes
    cdt = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(num_codes, dtype=cdt), x.new_empty((num_codes, x.shape[-1]), dtype=cdt)


def _nearest(backend: str, x, codebook, exact: bool):
    return backends.plain_op(_OP, "nearest_code", backend)(x, codebook, exact)


def codebook_stats_of_search(x: torch.Tensor, idx: torch.Tensor, num_codes: int,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`codebook_stats` for indices from this package's own search (so they lie in
    range): no argument checks, and so no host synchronisation on a GPU. For layers (an EMA
    codebook update from the indices its forward found)."""
    with torch.no_grad():
        return _stats(backends.resolve(backend, x.device, _OP), x, idx, num_codes)


def _stats(backend: str, x, idx, num_codes: int):
    return backends.plain_op(_OP, "codebook_stats", backend)(x, idx, num_codes)


# --------------------------------------------------------------------------- autograd
def _compute_dtype(x: torch.Tensor, codebook: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, codebook.dtype) else torch.float32


class VQFunction(torch.autograd.Function):
    """``(quantized, codebook_loss, commitment_loss) = VQFunction.apply(x, codebook, idx, backend)``.

    ``quantized`` passes its gradient straight through to ``x``; ``commitment_loss`` sends
    ``2 (x - e[idx]) / numel`` to x; ``codebook_loss`` sends ``2 (count_k e_k - sum_k) / numel`` to
    code k, from :func:`codebook_stats` (deterministic). Saves x, the codebook and the indices.
    Backward is differentiable again (the statistics op has a derivative of its own), and
    ``torch.func`` transforms work, each vmapped slice quantised as one call would.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, codebook, idx, backend: str):
        chosen = codebook.index_select(0, idx.reshape(-1)).reshape(x.shape)
        cdt = _compute_dtype(x, codebook)
        # the codes as stored (not rounded to x's dtype), in one fused pass
        mse = torch.nn.functional.mse_loss(x.to(cdt), chosen.to(cdt), reduction="sum") / max(x.numel(), 1)
        return chosen.to(x.dtype), mse, mse.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, codebook, idx, backend = inputs
        ctx.save_for_backward(x, codebook, idx)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_q, grad_codebook_loss, grad_commitment):
        x, codebook, idx = ctx.saved_tensors
        scale = 2.0 / max(x.numel(), 1)
        cdt = _compute_dtype(x, codebook)
        grad_x = grad_codebook = None
        if ctx.needs_input_grad[0]:
            if grad_commitment is not None:
                # (x - e[idx]) * 2 c / numel + grad_q, in place in one buffer; out of place where the
                # result must stay differentiable (create_graph=True) or torch.func transforms run
                q = codebook.index_select(0, idx.reshape(-1)).reshape(x.shape)
                grad_x = torch.sub(x.to(cdt), q.to(cdt))
                if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
                    grad_x = grad_x * (grad_commitment * scale) + (grad_q if grad_q is not None else 0)
                else:
                    grad_x.mul_(grad_commitment * scale)
                    if grad_q is not None:
                        grad_x.add_(grad_q)
            else:
                grad_x = grad_q.to(cdt) if grad_q is not None else torch.zeros_like(x, dtype=cdt)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1] and grad_codebook_loss is not None:
            counts, sums = backends.op_in_backward(_OP, "codebook_stats", ctx.backend)(x, idx, codebook.shape[0])
            grad_codebook = (grad_codebook_loss * scale) * (counts[:, None] * codebook.to(cdt) - sums.to(cdt))
            grad_codebook = grad_codebook.to(codebook.dtype)
        return grad_x, grad_codebook, None, None


# --------------------------------------------------------------------------- the ops' own derivatives
# Registered on the C++ ops and their Triton twins (pyvae.backends.load_op_family): exact to any
# order, as they are written with differentiable PyTorch operations.
def _nearest_setup_context(ctx, inputs, output):
    x, codebook, _ = inputs
    ctx.save_for_backward(x, codebook, output[0])


def _nearest_backward(backend: str):
    def backward(ctx, _grad_idx, grad_dist):
        """dist = |x - e[idx]|^2 (idx piecewise constant): 2 (x - e[idx]) to x, its negative to the code."""
        x, codebook, idx = ctx.saved_tensors
        if grad_dist is None:
            return None, None, None
        flat = idx.reshape(-1)
        diff = (x.float() - codebook.index_select(0, flat).reshape(x.shape).float()) * (2.0 * grad_dist.unsqueeze(-1))
        grad_codebook = torch.zeros(codebook.shape, dtype=diff.dtype, device=diff.device).index_add(
            0, flat, -diff.reshape(-1, codebook.shape[1]))
        return diff.to(x.dtype), grad_codebook.to(codebook.dtype), None
    return backward


def _stats_setup_context(ctx, inputs, output):
    x, idx, _ = inputs
    ctx.save_for_backward(idx)
    ctx.x_dtype = x.dtype


def _stats_backward(backend: str):
    def backward(ctx, _grad_counts, grad_sums):
        """sums = the rows of x added by code: each row gets its code's gradient (counts: none)."""
        (idx,) = ctx.saved_tensors
        if grad_sums is None:
            return None, None, None
        return grad_sums.index_select(0, idx.reshape(-1)).reshape(*idx.shape, -1).to(ctx.x_dtype), None, None
    return backward


# --------------------------------------------------------------------------- API
def _check(x, codebook, backend: str, precision: str = "exact") -> str:
    check_floating("x", x, "torch")
    check_floating("codebook", codebook, "torch")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code (K = 0)")
    if x.dim() == 0 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x must be [..., D] with D = {codebook.shape[1]} (the codebook's), got shape {tuple(x.shape)}")
    device = check_same_device(x=x, codebook=codebook)
    resolved = backends.resolve(backend, device, _OP)
    check_floating("x", x, resolved)
    check_floating("codebook", codebook, resolved)
    return resolved


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, precision: str = "exact",
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Index (int64, ``x.shape[:-1]``) and squared L2 distance (float32) of each row's nearest code.

    ``x`` is ``[..., D]``, ``codebook`` ``[K, D]``, float32 / float16 / bfloat16 (float64 on
    ``backend="torch"``), dtypes may differ; arithmetic is float32. ``precision="exact"``: on float32
    inputs the chosen code's float64 distance exceeds the float64 minimum by at most
    ``1e-5 (|x|^2 + |e_best|^2)`` (Triton: 3xTF32 tensor-core products). ``"fast"`` may use
    reduced-precision matrix units when x and the codebook share a dtype (Triton, CUDA): TF32 for
    float32, the 16-bit products themselves (exact, so that still meets the exact criterion) for
    float16/bfloat16; on the CPU, and for mixed dtypes, it is the same as exact. Memory: one block of distances at a time, never
    N x K. No gradient.
    """
    resolved = _check(x, codebook, backend, precision)
    with torch.no_grad():
        return _nearest(resolved, x, codebook, precision == "exact")


def codebook_stats(x: torch.Tensor, idx: torch.Tensor, num_codes: int, *,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code assignment counts (float32 ``[K]``) and sums of the assigned rows of x (float32
    ``[K, D]``), deterministic: what an EMA codebook update needs.

    ``idx`` is int64 of ``x.shape[:-1]`` with values in ``[0, num_codes)`` (checked; on a GPU the
    check reads the indices' range back to the host — the op itself, used by ``vector_quantize``'s
    backward, does not synchronise).
    """
    check_floating("x", x, "torch")
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if x.dim() == 0 or tuple(idx.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"idx must have x's shape without its last dim {tuple(x.shape[:-1])}, got {tuple(idx.shape)}")
    device = check_same_device(x=x, idx=idx)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_codes):
        raise ValueError(f"idx must lie in [0, num_codes = {num_codes}), got [{int(idx.min())}, {int(idx.max())}]")
    resolved = backends.resolve(backend, device, _OP)
    check_floating("x", x, resolved)
    with torch.no_grad():
        return _stats(resolved, x, idx, num_codes)


def vector_quantize(x: torch.Tensor, codebook: torch.Tensor, *, beta: float = 0.25, precision: str = "exact",
                    backend: str = "auto") -> VQResult:
    """Quantise x to its nearest codes (see :class:`VQResult`).

    ``loss = codebook_loss + beta * commitment_loss``; both losses are means over all elements of x
    (0, with zero gradient, for an empty x). Backward: x gets the straight-through gradient of
    ``quantized`` plus the commitment gradient; the codebook gets the codebook-loss gradient,
    computed from deterministic per-code counts and sums.
    """
    resolved = _check(x, codebook, backend, precision)
    with torch.no_grad():
        idx, _ = _nearest(resolved, x, codebook, precision == "exact")
    quantized, codebook_loss, commitment_loss = apply(VQFunction, x, codebook, idx, resolved)
    counts = code_counts(idx.reshape(-1), codebook.shape[0])
    perplexity = perplexity_of_frequencies(counts.float() / max(idx.numel(), 1))
    loss = codebook_loss + beta * commitment_loss
    return VQResult(quantized, idx, loss, commitment_loss, codebook_loss, counts, perplexity)


@torch.library.custom_op("pyvae::codebook_snapshot", mutates_args=())
def codebook_snapshot(codebook: torch.Tensor) -> torch.Tensor:
    """A copy of a codebook that an EMA layer updates in place after its forward: torch.compile's
    partitioner saves a custom op's output for backward instead of recomputing it from the (since
    updated) buffer, as it would a ``clone()`` (torch 2.13), which would give wrong gradients."""
    return codebook.clone()


@codebook_snapshot.register_fake
def _(codebook: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(codebook)


# --------------------------------------------------------------------------- registration
def _codebook_stats_cuda(x: torch.Tensor, idx: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernel of ``torch.ops.pyvae.codebook_stats``: the preparation it shares with the
    Triton backend, then the C++ kernels (``torch.ops.pyvae.codebook_chunk_sums``)."""
    contract.check_codebook_stats(x, idx, num_codes)
    return contract.codebook_stats_by_chunks(
        x, idx, num_codes, lambda x2, plan: torch.ops.pyvae.codebook_chunk_sums(x2, *plan))


def _register_cuda_stats() -> None:
    """:func:`_codebook_stats_cuda` as the CUDA kernel of the C++ op codebook_stats."""
    if backends.native_extension().has_cuda:
        torch.library.register_kernel("pyvae::codebook_stats", "cuda", _codebook_stats_cuda)


_FAMILY = backends.load_op_family(_OP, {"nearest_code": _torch_nearest_code, "codebook_stats": _torch_codebook_stats},
                                  derivatives={"nearest_code": (_nearest_setup_context, _nearest_backward),
                                               "codebook_stats": (_stats_setup_context, _stats_backward)},
                                  native_kernels=_register_cuda_stats)
_torch_nearest_code.register_autograd(_nearest_backward("torch"), setup_context=_nearest_setup_context)
_torch_nearest_code.register_vmap(backends.loop_vmap_rule("nearest_code_reference"))
_torch_codebook_stats.register_autograd(_stats_backward("torch"), setup_context=_stats_setup_context)
_torch_codebook_stats.register_vmap(backends.loop_vmap_rule("codebook_stats_reference"))
codebook_snapshot.register_autograd(lambda ctx, grad: grad)
codebook_snapshot.register_vmap(backends.loop_vmap_rule("codebook_snapshot"))
