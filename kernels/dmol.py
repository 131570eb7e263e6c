"""Triton kernels of the discretized mixture of logistics, registered as ``torch.ops.pyvae.*_triton``.

A program owns BLOCK consecutive positions of one sample and walks the M components twice: once
for the log-sum-exp of the joint log-probabilities (online), again for the gradient (recomputing
the component terms, so nothing of size M is kept). It writes its positions' NLLs or their sum,
which the launcher adds per sample in block order: deterministic, no atomics. The per-bin formulas
are those of ``csrc/common/dmol_math.h``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._layout import launch_device
from .contracts import dmol as contract
from .contracts.dmol import check_dmol_forward, check_dmol_sample, new_dmol_forward_outputs, new_dmol_sample_outputs

BLOCK = 128  # positions per program
# the contract's numbers, as the constexprs a jitted function may read
LOG_SCALE_MIN = tl.constexpr(contract.LOG_SCALE_MIN)
LOG_MID_MASS_MIN = tl.constexpr(contract.LOG_MID_MASS_MIN)
UNIFORM_MIN = tl.constexpr(contract.UNIFORM_MIN)


@triton.jit
def _sigmoid_pair(z):
    """(sigmoid(z), sigmoid(-z), exp(-|z|)), without cancellation."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, r, e * r), tl.where(z >= 0.0, e * r, r), e


@triton.jit
def _softplus(z, e):
    """softplus(z) given e = exp(-|z|)."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + e)


@triton.jit
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _one_minus_exp_neg(d):
    """1 - exp(-d) for d >= 0, a series for small d (one_minus_exp_neg)."""
    series = d * (1.0 - d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0 - d / 720.0)))))
    return tl.where(d < 0.25, series, 1.0 - tl.exp(-d))


@triton.jit
def _class(x, half_classes):
    """The class of x on the data grid: the nearest, ties to even (as round_nearest and torch.round)."""
    v = (x + 1.0) * half_classes
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(0.5 * r)) == 1.0
    return tl.where((r - v == 0.5) & odd, r - 1.0, r)


@triton.jit
def _bin_terms(centered, raw_log_scale, first, last, half_bin, log_half_classes):
    """(log P(bin), d/dcentered, d/draw log-scale) of one channel under one component (dmol_bin_terms)."""
    clamped = raw_log_scale < LOG_SCALE_MIN
    log_scale = tl.where(clamped, LOG_SCALE_MIN, raw_log_scale)
    inv_scale = tl.exp(-log_scale)
    a = inv_scale * (centered + half_bin)
    b = inv_scale * (centered - half_bin)
    m = inv_scale * centered
    width = inv_scale * (2.0 * half_bin)
    sa, sna, ea = _sigmoid_pair(a)
    sb, snb, eb = _sigmoid_pair(b)
    sm, snm, em = _sigmoid_pair(m)
    log_below = -_softplus(-a, ea)
    log_above = -_softplus(b, eb)
    kept = _one_minus_exp_neg(width)
    log_mass = log_below + log_above + tl.log(kept)
    inner = (first | last) == 0
    wide = log_mass > LOG_MID_MASS_MIN
    in_mid = inner & (wide == 0)
    log_mid = m - log_scale - 2.0 * _softplus(m, em) - log_half_classes
    log_prob = tl.where(first, log_below, tl.where(last, log_above, tl.where(wide, log_mass, log_mid)))
    d_a = tl.where(last | in_mid, 0.0, sna)
    d_b = tl.where(first | in_mid, 0.0, -sb)
    d_width = tl.where(inner & wide, (1.0 - kept) / kept, 0.0)
    d_m = tl.where(in_mid, snm - sm, 0.0)
    d_centered = inv_scale * (d_a + d_b + d_m)
    d_log_scale = -(a * d_a + b * d_b + m * d_m + width * d_width) - tl.where(in_mid, 1.0, 0.0)
    return log_prob, d_centered, tl.where(clamped, 0.0, d_log_scale)


@triton.jit
def _component(p_ptr, ps, i, M, BLK, x0, x1, x2, first0, last0, first1, last1, first2, last2, mask, half_bin,
               log_half_classes, C: tl.constexpr):
    """The joint log-probability terms of component i (its channels' bin terms) and what the
    gradient needs: each channel's (d/dcentered, d/dlog-scale) and the tanh coefficients."""
    m0 = tl.load(p_ptr + (M + i) * ps, mask=mask, other=0.0).to(tl.float32)
    s0 = tl.load(p_ptr + (M + M + i) * ps, mask=mask, other=0.0).to(tl.float32)
    lp0, dc0, dl0 = _bin_terms(x0 - m0, s0, first0, last0, half_bin, log_half_classes)
    if C == 3:
        coef = M + 2 * M + i
        t0 = _tanh(tl.load(p_ptr + coef * ps, mask=mask, other=0.0).to(tl.float32))
        t1 = _tanh(tl.load(p_ptr + (coef + BLK) * ps, mask=mask, other=0.0).to(tl.float32))
        t2 = _tanh(tl.load(p_ptr + (coef + 2 * BLK) * ps, mask=mask, other=0.0).to(tl.float32))
        m1 = tl.load(p_ptr + (M + BLK + i) * ps, mask=mask, other=0.0).to(tl.float32) + t0 * x0
        s1 = tl.load(p_ptr + (M + BLK + M + i) * ps, mask=mask, other=0.0).to(tl.float32)
        m2 = tl.load(p_ptr + (M + 2 * BLK + i) * ps, mask=mask, other=0.0).to(tl.float32) + t1 * x0 + t2 * x1
        s2 = tl.load(p_ptr + (M + 2 * BLK + M + i) * ps, mask=mask, other=0.0).to(tl.float32)
        lp1, dc1, dl1 = _bin_terms(x1 - m1, s1, first1, last1, half_bin, log_half_classes)
        lp2, dc2, dl2 = _bin_terms(x2 - m2, s2, first2, last2, half_bin, log_half_classes)
        return lp0 + lp1 + lp2, dc0, dl0, dc1, dl1, dc2, dl2, t0, t1, t2
    else:
        zero = tl.zeros_like(lp0)
        return lp0, dc0, dl0, zero, zero, zero, zero, zero, zero, zero


@triton.jit
def _dmol_kernel(params_ptr, x_ptr, out_ptr, grad_ptr, positions, n_blocks, M, p_bs, p_ns, p_js, x_bs, x_ns, x_cs,
                 half_bin, half_classes, last_class, log_half_classes, grad_scale, C: tl.constexpr,
                 PER_POSITION: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """NLL of BLOCK positions of sample program_id(1) and, with GRAD, its gradient (DmolParams)."""
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < positions
    p_ptr = params_ptr + b * p_bs + n * p_ns
    x_base = x_ptr + b * x_bs + n * x_ns
    BLK = 3 * M if C == 3 else 2 * M
    x0 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
    if C == 3:
        x1 = tl.load(x_base + x_cs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + 2 * x_cs, mask=mask, other=0.0).to(tl.float32)
    else:
        x1 = tl.zeros_like(x0)
        x2 = tl.zeros_like(x0)
    k0, k1, k2 = _class(x0, half_classes), _class(x1, half_classes), _class(x2, half_classes)
    first0, last0 = k0 <= 0.0, k0 >= last_class
    first1, last1 = k1 <= 0.0, k1 >= last_class
    first2, last2 = k2 <= 0.0, k2 >= last_class
    # log-softmax of the logits
    top = tl.full([BLOCK], -float("inf"), tl.float32)
    for i in range(M):
        top = tl.maximum(top, tl.load(p_ptr + i * p_js, mask=mask, other=0.0).to(tl.float32))
    total = tl.zeros([BLOCK], tl.float32)
    for i in range(M):
        total += tl.exp(tl.load(p_ptr + i * p_js, mask=mask, other=0.0).to(tl.float32) - top)
    log_norm = top + tl.log(total)
    # online log-sum-exp of the joint log-probabilities
    joint_top = tl.full([BLOCK], -float("inf"), tl.float32)
    joint_total = tl.zeros([BLOCK], tl.float32)
    for i in range(M):
        lp, _, _, _, _, _, _, _, _, _ = _component(p_ptr, p_js, i, M, BLK, x0, x1, x2, first0, last0, first1, last1,
                                                   first2, last2, mask, half_bin, log_half_classes, C)
        joint = tl.load(p_ptr + i * p_js, mask=mask, other=0.0).to(tl.float32) - log_norm + lp
        higher = joint > joint_top
        joint_total = tl.where(higher, joint_total * tl.exp(joint_top - joint) + 1.0,
                               joint_total + tl.exp(joint - joint_top))
        joint_top = tl.where(higher, joint, joint_top)
    nll = -(joint_top + tl.log(joint_total))
    if PER_POSITION:
        tl.store(out_ptr + b * positions + n, nll, mask=mask)
    else:
        tl.store(out_ptr + b * n_blocks + block, tl.sum(tl.where(mask, nll, 0.0), axis=0))
    if GRAD:
        g_ptr = grad_ptr + b * p_bs + n * p_ns
        ty = grad_ptr.dtype.element_ty
        for i in range(M):
            lp, dc0, dl0, dc1, dl1, dc2, dl2, t0, t1, t2 = _component(
                p_ptr, p_js, i, M, BLK, x0, x1, x2, first0, last0, first1, last1, first2, last2, mask, half_bin,
                log_half_classes, C)
            logit = tl.load(p_ptr + i * p_js, mask=mask, other=0.0).to(tl.float32)
            weight = tl.exp(logit - log_norm + lp + nll) * grad_scale  # the posterior of component i, scaled
            tl.store(g_ptr + i * p_js, (tl.exp(logit - log_norm) * grad_scale - weight).to(ty), mask=mask)
            tl.store(g_ptr + (M + i) * p_js, (weight * dc0).to(ty), mask=mask)
            tl.store(g_ptr + (M + M + i) * p_js, (-weight * dl0).to(ty), mask=mask)
            if C == 3:
                tl.store(g_ptr + (M + BLK + i) * p_js, (weight * dc1).to(ty), mask=mask)
                tl.store(g_ptr + (M + BLK + M + i) * p_js, (-weight * dl1).to(ty), mask=mask)
                tl.store(g_ptr + (M + 2 * BLK + i) * p_js, (weight * dc2).to(ty), mask=mask)
                tl.store(g_ptr + (M + 2 * BLK + M + i) * p_js, (-weight * dl2).to(ty), mask=mask)
                coef = M + 2 * M + i
                tl.store(g_ptr + coef * p_js, (weight * dc1 * x0 * (1.0 - t0 * t0)).to(ty), mask=mask)
                tl.store(g_ptr + (coef + BLK) * p_js, (weight * dc2 * x0 * (1.0 - t1 * t1)).to(ty), mask=mask)
                tl.store(g_ptr + (coef + 2 * BLK) * p_js, (weight * dc2 * x1 * (1.0 - t2 * t2)).to(ty), mask=mask)


@triton_op("pyvae::dmol_forward_triton", mutates_args=())
def dmol_forward_triton(params: torch.Tensor, x: torch.Tensor, num_mix: int, num_classes: int, channels_last: bool,
                        per_position: bool, want_grad: bool, grad_scale: float
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Triton twin of ``torch.ops.pyvae.dmol_forward`` (same schema, checks and outputs)."""
    check_dmol_forward(params, x, num_mix, num_classes, channels_last, per_position, want_grad, grad_scale)
    out, grads = new_dmol_forward_outputs(params, x, num_mix, num_classes, channels_last, per_position, want_grad,
                                          grad_scale)
    params, x = params.contiguous(), x.contiguous()
    ch = x.dim() - 1 if channels_last else 1
    batch, channels, num_params = x.shape[0], x.shape[ch], params.shape[ch]
    positions = x.numel() // (batch * channels) if batch else 0
    n_blocks = triton.cdiv(positions, BLOCK)
    partial = out if per_position else out.new_empty((batch, max(n_blocks, 1)))
    if batch and positions:
        with launch_device(params):
            wrap_triton(_dmol_kernel)[(n_blocks, batch)](
                params, x, partial, grads[0] if want_grad else params, positions, n_blocks, num_mix,
                positions * num_params, num_params if channels_last else 1, 1 if channels_last else positions,
                positions * channels, channels if channels_last else 1, 1 if channels_last else positions,
                1.0 / (num_classes - 1), 0.5 * (num_classes - 1), float(num_classes - 1),
                math.log(0.5 * (num_classes - 1)), grad_scale, C=channels, PER_POSITION=per_position,
                GRAD=want_grad, BLOCK=BLOCK)
    if not per_position:
        out = partial.sum(1) if positions else out.zero_()
    return out, grads


# --------------------------------------------------------------------------- sampling
@triton.jit
def _uniform_word(seed, n, word):
    """The sampler's uniform `word` of position n (int64 positions): word % 4 of Philox block n in
    stream word // 4, clamped to [UNIFORM_MIN, 1 - UNIFORM_MIN] (dmol_sample_position)."""
    w = tl.zeros_like(n) + word  # a tensor, whether word is a Python int (interpreter) or not
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    c2 = (w // 4).to(tl.uint32)
    c3 = tl.zeros_like(c0)
    i0, i1, i2, i3 = tl.philox(seed, c0, c1, c2, c3)
    lane = w % 4
    bits = tl.where(lane == 0, i0, tl.where(lane == 1, i1, tl.where(lane == 2, i2, i3)))
    u = tl.uint_to_uniform_float(bits)
    return tl.minimum(tl.maximum(u, UNIFORM_MIN), 1.0 - UNIFORM_MIN)


@triton.jit
def _dmol_sample_kernel(params_ptr, seed_ptr, x_ptr, total, positions, M, temperature, p_bs, p_ns, p_js, x_bs, x_ns,
                        x_cs, C: tl.constexpr, BLOCK: tl.constexpr):
    """A sample at BLOCK positions (flat over batch and positions): DmolSampleParams."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < total
    b = index // positions
    n = index % positions
    p_ptr = params_ptr + b * p_bs + n * p_ns
    seed = tl.load(seed_ptr)
    BLK = 3 * M if C == 3 else 2 * M
    best = tl.full([BLOCK], -float("inf"), tl.float32)
    choice = tl.zeros([BLOCK], tl.int64)
    for i in range(M):
        gumbel = -tl.log(-tl.log(_uniform_word(seed, index, i)))
        score = tl.load(p_ptr + i * p_js, mask=mask, other=0.0).to(tl.float32) + temperature * gumbel
        better = score > best
        best = tl.where(better, score, best)
        choice = tl.where(better, i, choice)
    x_base = x_ptr + b * x_bs + n * x_ns
    out0 = _channel_sample(p_ptr, p_js, seed, index, M, 0, BLK, choice, temperature, mask, 0.0)
    tl.store(x_base, out0, mask=mask)
    if C == 3:
        coef = M + 2 * M + choice
        t0 = _tanh(tl.load(p_ptr + coef * p_js, mask=mask, other=0.0).to(tl.float32))
        t1 = _tanh(tl.load(p_ptr + (coef + BLK) * p_js, mask=mask, other=0.0).to(tl.float32))
        t2 = _tanh(tl.load(p_ptr + (coef + 2 * BLK) * p_js, mask=mask, other=0.0).to(tl.float32))
        out1 = _channel_sample(p_ptr, p_js, seed, index, M, 1, BLK, choice, temperature, mask, t0 * out0)
        out2 = _channel_sample(p_ptr, p_js, seed, index, M, 2, BLK, choice, temperature, mask, t1 * out0 + t2 * out1)
        tl.store(x_base + x_cs, out1, mask=mask)
        tl.store(x_base + 2 * x_cs, out2, mask=mask)


@triton.jit
def _channel_sample(p_ptr, p_js, seed, index, M, channel, BLK, choice, temperature, mask, coupling):
    """Channel `channel`'s value (its uniform is the position's word M + channel): mean +
    temperature * scale * logit(u) + coupling, clamped to [-1, 1]."""
    v = _uniform_word(seed, index, M + channel)
    noise = tl.log(v) - tl.log(1.0 - v)
    at = M + channel * BLK + choice
    mean = tl.load(p_ptr + at * p_js, mask=mask, other=0.0).to(tl.float32)
    log_scale = tl.maximum(tl.load(p_ptr + (at + M) * p_js, mask=mask, other=0.0).to(tl.float32), LOG_SCALE_MIN)
    value = mean + temperature * tl.exp(log_scale) * noise + coupling
    return tl.minimum(tl.maximum(value, -1.0), 1.0)


@triton_op("pyvae::dmol_sample_triton", mutates_args=())
def dmol_sample_triton(params: torch.Tensor, seed: torch.Tensor, num_mix: int, channels: int, channels_last: bool,
                       temperature: float) -> torch.Tensor:
    """Triton twin of ``torch.ops.pyvae.dmol_sample`` (same schema, checks and outputs)."""
    check_dmol_sample(params, seed, num_mix, channels, channels_last, temperature)
    x = new_dmol_sample_outputs(params, seed, num_mix, channels, channels_last, temperature)
    params = params.contiguous()
    ch = params.dim() - 1 if channels_last else 1
    batch, num_params = params.shape[0], params.shape[ch]
    positions = params.numel() // (batch * num_params) if batch else 0
    total = batch * positions
    if total:
        with launch_device(params):
            wrap_triton(_dmol_sample_kernel)[(triton.cdiv(total, BLOCK),)](
                params, seed, x, total, positions, num_mix, temperature, positions * num_params,
                num_params if channels_last else 1, 1 if channels_last else positions, positions * channels,
                channels if channels_last else 1, 1 if channels_last else positions, C=channels, BLOCK=BLOCK)
    return x
