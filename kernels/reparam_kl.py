"""Triton kernels for reparameterize + KL, registered as ``torch.ops.pyvae.*_triton`` ops.

The noise stream is the one documented in ``csrc/common/philox.h``: four consecutive columns of a
row form a group; group j of row r of sample s draws ``tl.philox(seed, lo(r*G + j), hi(r*G + j), s, 0)``
(G = ceil(cols / 4)) and turns the four words into four normals with Triton's own
``uint_to_uniform_float`` and ``pair_uniform_to_normal`` (the mapping of ``tl.randn4x``).
A program owns BLOCK_R rows and walks their columns in BLOCK_G-group chunks, so the per-row KL sum
is a fixed-order in-register reduction: deterministic, no atomics.

With a Gaussian prior (PRIOR_MU / PRIOR_LOGVAR, compile-time flags: without one the kernels are the
prior-free ones) the KL is taken against N(prior_mu, exp(prior_logvar)) in the stable form of
``csrc/common/reparam_kl_math.h``; the prior tensors are read in place through their strides (0
where they broadcast), and backward writes their per-element float32 gradients, which the launcher
sums over the broadcast dims.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._layout import as_rows, as_rows_broadcast, launch_device
from .contracts.reparam_kl import (check_reparam_kl_backward, check_reparam_kl_forward,
                                   check_reparam_kl_packed_backward, check_reparam_kl_packed_forward,
                                   new_reparam_kl_backward_outputs, new_reparam_kl_forward_outputs,
                                   new_reparam_kl_packed_backward_outputs, new_reparam_kl_packed_forward_outputs)


@triton.jit
def _normal4(seed, rows, groups_per_row, g, sample):
    """The four normals of groups ``g`` (a [BLOCK_G] tensor) of ``rows`` ([BLOCK_R]); each [R, G]."""
    counter = rows[:, None] * groups_per_row + g[None, :]
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = (c0 * 0 + sample).to(tl.uint32)
    c3 = c0 * 0
    i0, i1, i2, i3 = tl.philox(seed, c0, c1, c2, c3)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3))
    return n0, n1, n2, n3


@triton.jit
def _eps(seed, rows, groups_per_row, g, sample, lane):
    """eps of groups ``g`` of ``rows`` as [R, G, 4]: element (r, g, k) is normal k of group (r, g)."""
    n0, n1, n2, n3 = _normal4(seed, rows, groups_per_row, g, sample)
    return tl.where(lane == 0, n0[:, :, None],
                    tl.where(lane == 1, n1[:, :, None], tl.where(lane == 2, n2[:, :, None], n3[:, :, None])))


@triton.jit
def _load_chunk(mu_ptr, logvar_ptr, r3, rows, cols, mu_row_stride, logvar_row_stride, g0, lane, logvar_min,
                logvar_max, BLOCK_G: tl.constexpr, CLAMP: tl.constexpr):
    """Groups [g0, g0 + BLOCK_G) of rows r3: (g, col, mask, mu, logvar, std, passes), tiles [R, G, 4]
    in fp32. CLAMP (the packed ops): logvar clamped to [logvar_min, logvar_max] as torch.clamp does
    (NaN stays NaN), and ``passes`` where its gradient passes (logvar_min <= logvar <= logvar_max)."""
    g = g0 + tl.arange(0, BLOCK_G)
    col = g[None, :, None] * 4 + lane
    mask = (r3 < rows) & (col < cols)
    mu = tl.load(mu_ptr + r3 * mu_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + r3 * logvar_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        passes = (logvar >= logvar_min) & (logvar <= logvar_max)
        logvar = tl.where(logvar < logvar_min, logvar_min, tl.where(logvar > logvar_max, logvar_max, logvar))
    else:
        passes = mask
    return g, col, mask, mu, logvar, tl.exp(0.5 * logvar), passes


@triton.jit
def _load_prior(ptr, r3, col, mask, row_stride, col_stride, PRESENT: tl.constexpr):
    """A prior tensor's tile [R, G, 4] in fp32, read with its strides (0 where it broadcasts); 0 if absent."""
    if PRESENT:
        value = tl.load(ptr + r3 * row_stride + col.to(tl.int64) * col_stride, mask=mask, other=0.0).to(tl.float32)
    else:
        value = tl.zeros(mask.shape, dtype=tl.float32)
    return value


@triton.jit
def _prior_kl_parts(mu, logvar, prior_mu, prior_logvar):
    """(x, half_r, s, u) of the KL against N(prior_mu, exp(prior_logvar)): see csrc/common/reparam_kl_math.h.
    x = logvar - prior_logvar, half_r = exp(x - ln 2), s = exp(-(prior_logvar + ln 2) / 2),
    u = (mu - prior_mu) s; the KL is u^2 + half_r - (x + 1) / 2, finite wherever it is finite."""
    x = logvar - prior_logvar
    d = mu - prior_mu
    s = tl.exp(-0.5 * (prior_logvar + 0.6931471805599453))
    return x, tl.exp(x - 0.6931471805599453), s, tl.where(d == 0.0, 0.0, d * s)


@triton.jit(do_not_specialize=["seed_value"])
def _reparam_kl_fwd_kernel(mu_ptr, logvar_ptr, seed_value, seed_ptr, z_ptr, kl_ptr, rows, cols, mu_row_stride,
                           logvar_row_stride, prior_mu_ptr, prior_logvar_ptr, prior_mu_row_stride, prior_mu_col_stride,
                           prior_logvar_row_stride, prior_logvar_col_stride, logvar_min, logvar_max,
                           SEED_GIVEN: tl.constexpr, KL_PER_ELEMENT: tl.constexpr, PRIOR_MU: tl.constexpr,
                           PRIOR_LOGVAR: tl.constexpr, CLAMP: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_G: tl.constexpr):
    sample = tl.program_id(1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    if SEED_GIVEN:  # record it for backward
        seed = seed_value.to(tl.int64)
        if (tl.program_id(0) == 0) & (sample == 0):
            tl.store(seed_ptr, seed)
    else:  # drawn on the device by the launcher
        seed = tl.load(seed_ptr)
    groups_per_row = (cols + 3) // 4
    lane = tl.arange(0, 4)[None, None, :]
    r3 = r[:, None, None]
    kl_rows = tl.zeros([BLOCK_R], dtype=tl.float32)
    for g0 in range(0, groups_per_row, BLOCK_G):
        g, col, mask, mu, logvar, std, _ = _load_chunk(mu_ptr, logvar_ptr, r3, rows, cols, mu_row_stride,
                                                       logvar_row_stride, g0, lane, logvar_min, logvar_max,
                                                       BLOCK_G, CLAMP)
        z = mu + std * _eps(seed, r, groups_per_row, g, sample, lane)
        # 64-bit before the product: samples * rows may pass 2**31
        tl.store(z_ptr + (sample.to(tl.int64) * rows + r3) * cols + col, z.to(z_ptr.dtype.element_ty), mask=mask)
        if sample == 0:
            if PRIOR_MU or PRIOR_LOGVAR:  # against N(prior_mu, exp(prior_logvar))
                prior_mu = _load_prior(prior_mu_ptr, r3, col, mask, prior_mu_row_stride, prior_mu_col_stride, PRIOR_MU)
                prior_logvar = _load_prior(prior_logvar_ptr, r3, col, mask, prior_logvar_row_stride,
                                           prior_logvar_col_stride, PRIOR_LOGVAR)
                x, half_r, s, u = _prior_kl_parts(mu, logvar, prior_mu, prior_logvar)
                kl = u * u + half_r - 0.5 * (x + 1.0)
            else:  # against N(0, I)
                kl = 0.5 * (mu * mu + std * std - 1.0 - logvar)
            if KL_PER_ELEMENT:
                tl.store(kl_ptr + r3 * cols + col, kl, mask=mask)
            else:
                kl_rows += tl.sum(tl.sum(tl.where(mask, kl, 0.0), axis=2), axis=1)
    if not KL_PER_ELEMENT:
        if sample == 0:
            tl.store(kl_ptr + r, kl_rows, mask=r < rows)


@triton.jit
def _reparam_kl_bwd_kernel(mu_ptr, logvar_ptr, seed_ptr, grad_z_ptr, grad_kl_ptr, grad_mu_ptr,
                           grad_logvar_ptr, rows, cols, samples, grad_z_sample_stride, grad_z_row_stride,
                           grad_z_col_stride, mu_row_stride, logvar_row_stride,
                           grad_kl_row_stride, grad_kl_col_stride, prior_mu_ptr, prior_logvar_ptr,
                           prior_mu_row_stride, prior_mu_col_stride, prior_logvar_row_stride, prior_logvar_col_stride,
                           grad_prior_mu_ptr, grad_prior_logvar_ptr, grad_mu_row_stride, grad_logvar_row_stride,
                           logvar_min, logvar_max, HAS_GRAD_Z: tl.constexpr,
                           HAS_GRAD_KL: tl.constexpr, PRIOR_MU: tl.constexpr, PRIOR_LOGVAR: tl.constexpr,
                           PRIOR_MU_GRAD: tl.constexpr, PRIOR_LOGVAR_GRAD: tl.constexpr, CLAMP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """PRIOR_MU / PRIOR_LOGVAR: the KL is against that prior (set only with HAS_GRAD_KL: without a KL
    gradient the prior plays no part); *_GRAD: write its per-element gradients (float32). The
    gradients of mu and logvar have row strides of their own (the packed op writes both into one
    [rows, 2, cols] tensor); CLAMP: logvar is clamped, and its gradient is 0 where the clamp stops it."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    seed = tl.load(seed_ptr)
    groups_per_row = (cols + 3) // 4
    lane = tl.arange(0, 4)[None, None, :]
    r3 = r[:, None, None]
    for g0 in range(0, groups_per_row, BLOCK_G):
        g, col, mask, mu, logvar, std, passes = _load_chunk(mu_ptr, logvar_ptr, r3, rows, cols, mu_row_stride,
                                                            logvar_row_stride, g0, lane, logvar_min, logvar_max,
                                                            BLOCK_G, CLAMP)
        grad_mu = tl.zeros([BLOCK_R, BLOCK_G, 4], dtype=tl.float32)
        grad_z_eps = tl.zeros([BLOCK_R, BLOCK_G, 4], dtype=tl.float32)
        if HAS_GRAD_Z:
            for sample in range(0, samples):
                # 64-bit: the offsets may pass 2**31; strides 0 read an expanded gradient in place
                gz_at = (tl.cast(sample, tl.int64) * grad_z_sample_stride + r3 * grad_z_row_stride
                         + col.to(tl.int64) * grad_z_col_stride)
                gz = tl.load(grad_z_ptr + gz_at, mask=mask, other=0.0).to(tl.float32)
                grad_mu += gz
                grad_z_eps += gz * _eps(seed, r, groups_per_row, g, sample, lane)
        # a missing upstream gradient adds nothing (not 0 * inf for an infinite std or mu)
        grad_logvar = 0.5 * std * grad_z_eps if HAS_GRAD_Z else tl.zeros([BLOCK_R, BLOCK_G, 4], dtype=tl.float32)
        if HAS_GRAD_KL:
            # 64-bit: a transposed upstream gradient's column stride times the column may pass 2**31
            gkl = tl.load(grad_kl_ptr + r3 * grad_kl_row_stride + col.to(tl.int64) * grad_kl_col_stride, mask=mask,
                          other=0.0)
            if PRIOR_MU or PRIOR_LOGVAR:
                prior_mu = _load_prior(prior_mu_ptr, r3, col, mask, prior_mu_row_stride, prior_mu_col_stride, PRIOR_MU)
                prior_logvar = _load_prior(prior_logvar_ptr, r3, col, mask, prior_logvar_row_stride,
                                           prior_logvar_col_stride, PRIOR_LOGVAR)
                x, half_r, s, u = _prior_kl_parts(mu, logvar, prior_mu, prior_logvar)
                # d w; 0 for d = 0 also where s overflows (u = 0 there, and 0 * inf would be NaN)
                d_mu = gkl * tl.where((u == 0.0) & (s == float("inf")), 0.0, 2.0 * (u * s))
                grad_mu += d_mu
                grad_logvar += gkl * (half_r - 0.5)
                if PRIOR_MU_GRAD:
                    tl.store(grad_prior_mu_ptr + r3 * cols + col, -d_mu, mask=mask)
                if PRIOR_LOGVAR_GRAD:
                    tl.store(grad_prior_logvar_ptr + r3 * cols + col, gkl * (0.5 - half_r - u * u), mask=mask)
            else:
                grad_mu += gkl * mu
                grad_logvar += gkl * 0.5 * (std * std - 1.0)
        if CLAMP:
            grad_logvar = tl.where(passes, grad_logvar, 0.0)
        tl.store(grad_mu_ptr + r3 * grad_mu_row_stride + col, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + r3 * grad_logvar_row_stride + col,
                 grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def _grad_z_rows(grad_z: torch.Tensor, samples: int, rows: int, cols: int) -> torch.Tensor:
    """grad_z as [samples, rows, cols], read in place (an expanded gradient too: stride 0) unless its
    columns are strided."""
    g = grad_z.reshape(samples, rows, cols)
    return g if cols == 1 or g.stride(2) in (0, 1) else g.contiguous()


def _tile(cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_G): about 2048 elements a chunk, whole short rows per program."""
    groups = max(1, (cols + 3) // 4)
    block_g = min(triton.next_power_of_2(groups), 256)
    block_r = max(1, 512 // block_g)
    return block_r, block_g


def _prior_args(prior: Optional[torch.Tensor], mu2: torch.Tensor, shape: torch.Size, rows: int,
                cols: int) -> tuple[torch.Tensor, int, int]:
    """(tensor, row stride, column stride) of a prior as the kernels read it (as_rows_broadcast), or
    mu's [rows, cols] view and zero strides as a placeholder when it is absent."""
    if prior is None:
        return mu2, 0, 0
    p2 = as_rows_broadcast(prior, shape, rows, cols)
    return p2, p2.stride(0), p2.stride(1) if cols > 1 else 1


def _key_or_empty_call(seed: Optional[int], seed_used: torch.Tensor, kl: torch.Tensor, rows: int, cols: int
                       ) -> tuple[torch.Tensor, bool]:
    """A forward's key tensor (for ``seed=None`` drawn by ``torch.randint`` on the device: Triton
    cannot read PyTorch's CUDA generator state the way the CUDA kernel does), and whether the call
    is done already: nothing to draw (an empty KL sum is 0; a given seed is recorded, as on the CPU)."""
    if seed is None:
        seed_used = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=kl.device)
    if cols == 0:
        kl.zero_()
    if (rows == 0 or cols == 0) and seed is not None:
        seed_used.fill_(seed)
    return seed_used, rows == 0 or cols == 0


@triton_op("pyvae::reparam_kl_forward_triton", mutates_args=())
def reparam_kl_forward_triton(mu: torch.Tensor, logvar: torch.Tensor, seed: Optional[int], n_samples: int,
                              kl_per_element: bool, prior_mu: Optional[torch.Tensor] = None,
                              prior_logvar: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.reparam_kl_forward`` (same schema, checks and outputs).

    With ``seed=None`` the key is drawn by ``torch.randint`` on the device first (a second launch:
    Triton cannot read PyTorch's CUDA generator state the way the CUDA kernel does).
    """
    check_reparam_kl_forward(mu, logvar, seed, n_samples, kl_per_element, prior_mu, prior_logvar)
    cols = mu.shape[-1]
    rows = mu.numel() // cols if cols else 0
    z, kl, seed_used = new_reparam_kl_forward_outputs(mu, logvar, seed, n_samples, kl_per_element)
    seed_used, done = _key_or_empty_call(seed, seed_used, kl, rows, cols)
    if done:
        return z, kl, seed_used
    if n_samples > 65535:
        raise ValueError(f"n_samples must be <= 65535 on the triton backend, got {n_samples}")
    mu2, logvar2 = as_rows(mu, rows, cols), as_rows(logvar, rows, cols)
    pm, pm_rs, pm_cs = _prior_args(prior_mu, mu2, mu.shape, rows, cols)
    plv, plv_rs, plv_cs = _prior_args(prior_logvar, mu2, mu.shape, rows, cols)
    block_r, block_g = _tile(cols)
    grid = (triton.cdiv(rows, block_r), n_samples)
    with launch_device(mu):
        wrap_triton(_reparam_kl_fwd_kernel)[grid](
            mu2, logvar2, 0 if seed is None else seed, seed_used, z, kl, rows, cols, mu2.stride(0), logvar2.stride(0),
            pm, plv, pm_rs, pm_cs, plv_rs, plv_cs, 0.0, 0.0,
            SEED_GIVEN=seed is not None, KL_PER_ELEMENT=kl_per_element, PRIOR_MU=prior_mu is not None,
            PRIOR_LOGVAR=prior_logvar is not None, CLAMP=False, BLOCK_R=block_r, BLOCK_G=block_g)
    return z, kl, seed_used


def _reduce_prior_grad(per_element: Optional[torch.Tensor], prior: Optional[torch.Tensor], wanted: bool,
                       mu: torch.Tensor) -> torch.Tensor:
    """A prior's gradient in its shape and dtype: the per-element float32 values summed over the dims
    where it broadcasts (a fixed-order torch sum), zeros without a KL gradient, empty if not wanted."""
    if not wanted:
        return mu.new_empty(0)
    if per_element is None:
        return torch.zeros_like(prior, memory_format=torch.contiguous_format)
    return per_element.view(mu.shape).sum_to_size(prior.shape).to(prior.dtype).contiguous()


@triton_op("pyvae::reparam_kl_backward_triton", mutates_args=())
def reparam_kl_backward_triton(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                               grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None,
                               prior_mu: Optional[torch.Tensor] = None, prior_logvar: Optional[torch.Tensor] = None,
                               prior_mu_grad: bool = False, prior_logvar_grad: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.reparam_kl_backward`` (same schema, checks and outputs)."""
    check_reparam_kl_backward(mu, logvar, seed, grad_z, grad_kl, prior_mu, prior_logvar, prior_mu_grad,
                              prior_logvar_grad)
    cols = mu.shape[-1]
    rows = mu.numel() // cols if cols else 0
    # the priors' gradients come from _reduce_prior_grad, in their own shapes
    grad_mu, grad_logvar = new_reparam_kl_backward_outputs(mu, logvar, seed, grad_z, grad_kl)[:2]
    # the prior plays a part only through the KL's gradient
    with_prior = grad_kl is not None and (prior_mu is not None or prior_logvar is not None)
    per_element = [mu.new_empty((rows, cols), dtype=torch.float32) if with_prior and wanted else None
                   for wanted in (prior_mu_grad, prior_logvar_grad)]
    if rows > 0 and cols > 0:
        mu2, logvar2 = as_rows(mu, rows, cols), as_rows(logvar, rows, cols)
        gz = _grad_z_rows(grad_z, grad_z.shape[0], rows, cols) if grad_z is not None else mu2[None]
        gkl = grad_kl.reshape(rows, cols) if grad_kl is not None else mu2
        pm, pm_rs, pm_cs = _prior_args(prior_mu if with_prior else None, mu2, mu.shape, rows, cols)
        plv, plv_rs, plv_cs = _prior_args(prior_logvar if with_prior else None, mu2, mu.shape, rows, cols)
        block_r, block_g = _tile(cols)
        with launch_device(mu):
            wrap_triton(_reparam_kl_bwd_kernel)[(triton.cdiv(rows, block_r),)](
                mu2, logvar2, seed, gz, gkl, grad_mu, grad_logvar, rows, cols,
                grad_z.shape[0] if grad_z is not None else 0, *gz.stride(), mu2.stride(0), logvar2.stride(0),
                gkl.stride(0), gkl.stride(1), pm, plv, pm_rs, pm_cs, plv_rs, plv_cs,
                per_element[0] if per_element[0] is not None else grad_mu,
                per_element[1] if per_element[1] is not None else grad_mu, cols, cols, 0.0, 0.0,
                HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None,
                PRIOR_MU=with_prior and prior_mu is not None, PRIOR_LOGVAR=with_prior and prior_logvar is not None,
                PRIOR_MU_GRAD=per_element[0] is not None, PRIOR_LOGVAR_GRAD=per_element[1] is not None,
                CLAMP=False, BLOCK_R=block_r, BLOCK_G=block_g)
    return (grad_mu, grad_logvar, _reduce_prior_grad(per_element[0], prior_mu, prior_mu_grad, mu),
            _reduce_prior_grad(per_element[1], prior_logvar, prior_logvar_grad, mu))


# ------------------------------------------------------------------------------ the packed ops
def _packed_rows(params: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """params [..., 2, Z] as [rows, 2, cols] with unit column stride (a view where the strides allow)."""
    cols = params.shape[-1]
    rows = params.numel() // (2 * cols) if cols else 0
    p3 = params.reshape(rows, 2, cols)
    return p3 if p3.stride(2) == 1 or cols == 1 else p3.contiguous(), rows, cols


def _bounds(logvar_min: Optional[float], logvar_max: Optional[float]) -> tuple[bool, float, float]:
    clamp = logvar_min is not None or logvar_max is not None
    return (clamp, float("-inf") if logvar_min is None else float(logvar_min),
            float("inf") if logvar_max is None else float(logvar_max))


@triton_op("pyvae::reparam_kl_packed_forward_triton", mutates_args=())
def reparam_kl_packed_forward_triton(params: torch.Tensor, seed: Optional[int], kl_per_element: bool,
                                     logvar_min: Optional[float] = None, logvar_max: Optional[float] = None
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.pyvae.reparam_kl_packed_forward`` (same schema, checks and outputs):
    the forward kernel reading mu and logvar as the two halves of each [2, Z] row pair of params."""
    check_reparam_kl_packed_forward(params, seed, kl_per_element, logvar_min, logvar_max)
    z, kl, seed_used = new_reparam_kl_packed_forward_outputs(params, seed, kl_per_element)
    p3, rows, cols = _packed_rows(params)
    seed_used, done = _key_or_empty_call(seed, seed_used, kl, rows, cols)
    if done:
        return z, kl, seed_used
    clamp, lo, hi = _bounds(logvar_min, logvar_max)
    mu2, logvar2 = p3[:, 0], p3[:, 1]
    block_r, block_g = _tile(cols)
    with launch_device(params):
        wrap_triton(_reparam_kl_fwd_kernel)[(triton.cdiv(rows, block_r), 1)](
            mu2, logvar2, 0 if seed is None else seed, seed_used, z, kl, rows, cols, p3.stride(0), p3.stride(0),
            mu2, mu2, 0, 0, 0, 0, lo, hi,
            SEED_GIVEN=seed is not None, KL_PER_ELEMENT=kl_per_element, PRIOR_MU=False, PRIOR_LOGVAR=False,
            CLAMP=clamp, BLOCK_R=block_r, BLOCK_G=block_g)
    return z, kl, seed_used


@triton_op("pyvae::reparam_kl_packed_backward_triton", mutates_args=())
def reparam_kl_packed_backward_triton(params: torch.Tensor, seed: torch.Tensor, grad_z: Optional[torch.Tensor],
                                      grad_kl: Optional[torch.Tensor], logvar_min: Optional[float] = None,
                                      logvar_max: Optional[float] = None) -> torch.Tensor:
    """Triton twin of ``torch.ops.pyvae.reparam_kl_packed_backward`` (same schema, checks and outputs):
    the backward kernel writing the gradients of mu and logvar into the two halves of one tensor."""
    check_reparam_kl_packed_backward(params, seed, grad_z, grad_kl, logvar_min, logvar_max)
    grad_params = new_reparam_kl_packed_backward_outputs(params, seed, grad_z, grad_kl)
    p3, rows, cols = _packed_rows(params)
    if rows > 0 and cols > 0:
        clamp, lo, hi = _bounds(logvar_min, logvar_max)
        mu2, logvar2 = p3[:, 0], p3[:, 1]
        g3 = grad_params.view(rows, 2, cols)
        gz = _grad_z_rows(grad_z, 1, rows, cols) if grad_z is not None else mu2[None]
        gkl = grad_kl.reshape(rows, cols) if grad_kl is not None else mu2
        block_r, block_g = _tile(cols)
        with launch_device(params):
            wrap_triton(_reparam_kl_bwd_kernel)[(triton.cdiv(rows, block_r),)](
                mu2, logvar2, seed, gz, gkl, g3[:, 0], g3[:, 1], rows, cols, 1 if grad_z is not None else 0,
                *gz.stride(), p3.stride(0), p3.stride(0), gkl.stride(0), gkl.stride(1), mu2, mu2, 0, 0, 0, 0, g3, g3,
                2 * cols, 2 * cols, lo, hi,
                HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None, PRIOR_MU=False, PRIOR_LOGVAR=False,
                PRIOR_MU_GRAD=False, PRIOR_LOGVAR_GRAD=False, CLAMP=clamp, BLOCK_R=block_r, BLOCK_G=block_g)
    return grad_params
