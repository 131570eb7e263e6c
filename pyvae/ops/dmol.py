"""Discretized mixture of logistics (DMOL; Salimans et al. 2017): the likelihood of 8-bit (or
16-bit) data of PixelCNN++, VDVAE, NVAE and WaveNet-style vocoders, fused.

Layers of this op family:
    kernels   ``csrc/cpu/dmol.cpp``, ``csrc/cuda/dmol.cu``, ``kernels/dmol.py``; per-position
              formulas in ``csrc/common/dmol_math.h``;
    ops       ``torch.ops.pyvae.dmol_forward`` (negative log-likelihood and, in the same read of
              the inputs, its gradient to the parameters) and ``dmol_sample`` (a seeded sample of
              the mixture), C++ (CPU and CUDA) with ``_triton`` twins; contracts in
              ``kernels/contracts/dmol.py``;
    autograd  :class:`DMOLFunction`: as the other likelihoods, forward writes the per-sample sums
              and, when autograd will need it, the gradient of the reduced loss at a unit upstream
              gradient; backward scales that buffer in place. Forward+backward keeps the gradient
              buffer (the size of ``params``) and references to the inputs, nothing of size
              ``B·C·M·positions``; a backward with ``create_graph=True`` recomputes the gradient
              through the op's derivative (the reference's), so higher orders are exact;
    API       :func:`discretized_mix_logistic_nll`, :func:`discretized_mix_logistic_sample`,
              :func:`discretized_mix_logistic_mean`, :func:`bits_per_dim`.

**Layout.** ``layout="channels_last"``: ``params [B, *positions, P]`` and ``x [B, *positions, C]``
(PixelCNN++ and VDVAE); ``"channels_first"``: ``params [B, P, *positions]``, ``x [B, C, *positions]``
(NVAE). Positions are any number of dims (H, W for images, T for audio). The P parameters of a
position, for M mixture components: the M mixture logits, then for each channel c the block
``[means (M), log-scales (M), coefficients (M)]``: P = 10M for RGB (C = 3), whose coefficients
couple the channels (G's mean shifts by ``tanh(coef_0)·R``, B's by ``tanh(coef_1)·R +
tanh(coef_2)·G``); C = 1 (grey images, audio) has nothing to couple and no coefficients: P = 3M
(PixelCNN++'s one-channel loss, WaveNet's).

**Data.** Floats in [-1, 1] on the grid ``k / (num_classes - 1) * 2 - 1``, or integer class indices
``k`` in ``[0, num_classes)``: the same result. The class index decides the bin: class 0 and class
``num_classes - 1`` use the open-ended CDF, so 16-bit data is right too.

**Numerics.** Log-scales are clamped below at -7; the bin's half-width is ``1 / (num_classes - 1)``;
where a bin's mass is below 1e-5 its log-probability is the mid-bin log-density minus
``log((num_classes - 1) / 2)``; mixtures are combined by log-sum-exp; float32 arithmetic
(float64 on the torch backend for float64 inputs); bf16 and fp16 parameters accepted. A bin's
log-mass ``log(σ(a) - σ(b))`` (a, b its edges, standardised) is computed as ``log σ(a) + log σ(-b) +
log(1 - exp(-(a - b)))``, the same value without the difference of two nearly equal probabilities,
so the narrow bins of 16-bit data keep their digits in float32. A NaN parameter gives a NaN loss for
its position.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import backends
from ..kernels.contracts import REFERENCE_DTYPES
from ..kernels.contracts import dmol as contract
from . import philox
from ._common import apply, check_floating, check_reduction, check_same_device, reduce_rows, reference_derivative

__all__ = ["discretized_mix_logistic_nll", "discretized_mix_logistic_sample", "discretized_mix_logistic_mean",
           "bits_per_dim", "quantize", "data_grid", "DMOLFunction", "DMOLSpec", "dmol_reference",
           "dmol_sample_reference", "dmol_num_params"]

_OP = "dmol"
LAYOUTS = ("channels_first", "channels_last")
LOG_SCALE_MIN = contract.LOG_SCALE_MIN
dmol_num_params = contract.num_params


# --------------------------------------------------------------------------- the reference
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_params(params_cl: torch.Tensor, num_mix: int, channels: int):
    """Channels-last parameters [..., P] as (logits [..., M], means [..., C, M], log-scales
    [..., C, M] (unclamped), coefficients [..., C, M] or None for one channel)."""
    logits = params_cl[..., :num_mix]
    per_channel = params_cl[..., num_mix:].unflatten(-1, (channels, -1))
    coeffs = per_channel[..., 2 * num_mix:3 * num_mix] if channels == 3 else None
    return logits, per_channel[..., :num_mix], per_channel[..., num_mix:2 * num_mix], coeffs


def coupled_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The channels' means given the channels before them (x [..., C] on the data grid)."""
    if coeffs is None:
        return means
    t = torch.tanh(coeffs)
    x0, x1 = x[..., 0:1], x[..., 1:2]
    return torch.stack([means[..., 0, :], means[..., 1, :] + t[..., 0, :] * x0,
                        means[..., 2, :] + t[..., 1, :] * x0 + t[..., 2, :] * x1], dim=-2)


def class_index(x_grid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class k of each value on the grid k / (num_classes - 1) * 2 - 1 (nearest)."""
    return torch.round((x_grid + 1.0) * (0.5 * (num_classes - 1)))


def dmol_reference(params: torch.Tensor, x: torch.Tensor, num_mix: int, num_classes: int,
                   channels_last: bool) -> torch.Tensor:
    """The negative log-likelihood of each position, ``[B, *positions]`` (float32; float64 for
    float64 params), summed over the channels; ``x`` floats on the data grid. Differentiable in
    ``params`` (to any order): the oracle every backend is tested against, in float64."""
    cdt = _compute_dtype(params.dtype)
    params_cl = (params if channels_last else params.movedim(1, -1)).to(cdt)
    x_cl = (x if channels_last else x.movedim(1, -1)).to(cdt)
    channels = x_cl.shape[-1]
    logits, means, log_scales, coeffs = split_params(params_cl, num_mix, channels)
    k = class_index(x_cl, num_classes)[..., None]
    half_bin = 1.0 / (num_classes - 1)
    centered = x_cl[..., None] - coupled_means(means, coeffs, x_cl)
    log_scales = log_scales.clamp(min=LOG_SCALE_MIN)
    inv_scale = torch.exp(-log_scales)
    plus_in = inv_scale * (centered + half_bin)  # the bin's edges, standardised
    min_in = inv_scale * (centered - half_bin)
    mid_in = inv_scale * centered
    log_below = -F.softplus(-plus_in)  # log sigma(a): class 0's log-probability
    log_above = -F.softplus(min_in)  # log(1 - sigma(b)): the last class's
    # log(sigma(a) - sigma(b)) written without the difference of two nearly equal probabilities
    log_mass = log_below + log_above + torch.log(-torch.expm1(-inv_scale * (2.0 * half_bin)))
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_mid = torch.where(log_mass > contract.LOG_MID_MASS_MIN, log_mass,
                          log_pdf_mid - math.log(0.5 * (num_classes - 1)))
    log_prob = torch.where(k == 0, log_below, torch.where(k == num_classes - 1, log_above, log_mid))
    joint = log_prob.sum(-2) + torch.log_softmax(logits, dim=-1)
    return -torch.logsumexp(joint, dim=-1)


def _torch_forward(params, x, num_mix, num_classes, channels_last, per_position, want_grad, grad_scale):
    """The torch backend of ``dmol_forward``: its signature and outputs. Differentiable (its
    gradient too, under grad mode: this is the op's derivative, see the registration)."""
    contract.check_dmol_forward(params, x, num_mix, num_classes, channels_last, per_position, want_grad, grad_scale,
                                dtypes=REFERENCE_DTYPES)
    nll = dmol_reference(params, x, num_mix, num_classes, channels_last)
    out = nll if per_position or nll.dim() == 1 else nll.flatten(1).sum(1)
    if not want_grad:
        return out, []

    def total(p):
        return dmol_reference(p, x, num_mix, num_classes, channels_last).sum() * grad_scale

    # torch.func.grad: it runs under no_grad (in a Function's forward), stays differentiable under
    # grad mode, and composes with the torch.func transforms
    return out, [torch.func.grad(total)(params).to(params.dtype)]


def _forward_op(backend: str):
    return backends.plain_op(_OP, "dmol_forward", backend)


# --------------------------------------------------------------------------- autograd
class DMOLSpec(NamedTuple):
    """What one :class:`DMOLFunction` computes: the loss of ``num_mix`` components over
    ``num_classes`` classes, parameters laid out channels-last or not, with ``reduction``, on
    ``backend`` (a concrete one)."""
    num_mix: int
    num_classes: int
    channels_last: bool
    reduction: str
    backend: str


_SCALAR_REDUCTIONS = ("sum", "batchmean", "mean")


def _grad_scale(reduction: str, x: torch.Tensor) -> float:
    """The factor the reduction applies to every position's gradient."""
    if reduction == "batchmean" and x.shape[0] > 0:
        return 1.0 / x.shape[0]
    if reduction == "mean" and x.numel() > 0:
        return 1.0 / x.numel()
    return 1.0


def _kernel_grad_scale(reduction: str, x: torch.Tensor) -> float:
    """The reduction's factor, folded into the kernel's gradient, except under torch.compile (a
    float computed from the shape would make the graph specialise on it: backward applies it)."""
    return 1.0 if torch.compiler.is_compiling() else _grad_scale(reduction, x)


def _upstream_like_params(grad_out: torch.Tensor, spec: DMOLSpec, params: torch.Tensor) -> torch.Tensor:
    """The upstream gradient, broadcastable to ``params``: one value, one per sample, or (for
    ``"none"``) one per position, repeated over the parameters of the position."""
    grad_out = grad_out.to(torch.promote_types(grad_out.dtype, torch.float32))
    if spec.reduction in _SCALAR_REDUCTIONS:
        return grad_out.reshape(())
    if spec.reduction == "per_sample":
        return grad_out.reshape(-1, *([1] * (params.dim() - 1)))
    return grad_out.unsqueeze(-1 if spec.channels_last else 1)


class DMOLFunction(torch.autograd.Function):
    """``nll, unit_grad = DMOLFunction.apply(spec, params, x, grad_mode, needs_grad)``: ``spec`` a
    :class:`DMOLSpec`, ``x`` floats on the data grid, ``grad_mode`` being ``torch.is_grad_enabled()``
    where the caller is, ``needs_grad`` whether params needs a gradient (default: its
    ``requires_grad``; under ``torch.func`` transforms pass it). ``unit_grad`` is the forward op's
    gradient buffer at a unit upstream gradient, which backward scales in place: the caller drops
    it. No gradient flows to ``x`` (data)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spec: DMOLSpec, params, x, grad_mode=True, needs_grad=None):
        want = bool(grad_mode and (params.requires_grad if needs_grad is None else needs_grad))
        out, grads = _forward_op(spec.backend)(params, x, spec.num_mix, spec.num_classes, spec.channels_last,
                                               spec.reduction == "none", want, _kernel_grad_scale(spec.reduction, x))
        if spec.reduction not in ("none", "per_sample"):
            out = reduce_rows(out, spec.reduction, x.numel())
        return out, (grads[0] if want else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, params, x, *_ = inputs
        ctx.unit_grad = output[1]  # an attribute, not a saved tensor: backward scales it in place
        if output[1] is not None:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(params, x)
        ctx.spec = spec
        ctx.upstream_scale = _grad_scale(spec.reduction, x) / _kernel_grad_scale(spec.reduction, x)

    @staticmethod
    def backward(ctx, grad_out, _unit_grad):
        params, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            spec = ctx.spec
            _, (grad,) = backends.differentiable_op(_OP, "dmol_forward", spec.backend)(
                params, x, spec.num_mix, spec.num_classes, spec.channels_last, False, True,
                _grad_scale(spec.reduction, x))
            return None, (grad * _upstream_like_params(grad_out, spec, params)).to(params.dtype), None, None, None
        grad = ctx.unit_grad
        if grad is None:
            if ctx.needs_input_grad[1]:
                raise RuntimeError("Trying to backward through a pyvae likelihood a second time: its gradient buffer "
                                   "was used by the first backward. Specify retain_graph=True on the first backward.")
            return None, None, None, None, None
        # with retain_graph=True the unit gradient must survive for the next backward: scale a copy
        if torch.compiler.is_compiling() or torch._C._autograd._get_current_graph_task_keep_graph():
            grad = grad.clone()
        else:
            ctx.unit_grad = None  # frees the buffer once autograd has taken the gradient
        upstream = _upstream_like_params(grad_out, ctx.spec, params)
        if not isinstance(ctx.upstream_scale, float) or ctx.upstream_scale != 1.0:
            upstream = upstream * ctx.upstream_scale
        return None, grad.mul_(upstream), None, None, None


# --------------------------------------------------------------------------- API
def _channel_dim(layout: str) -> int:
    return -1 if layout == "channels_last" else 1


def _check(params, x, num_mix, num_classes, layout) -> None:
    """Everything about the arguments but the values of x."""
    check_floating("params", params, "torch")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must be floats in [-1, 1] or integer class indices, got {x.dtype}")
    if isinstance(num_mix, bool) or not isinstance(num_mix, int) or num_mix < 1:
        raise ValueError(f"num_mix must be a positive int, got {num_mix!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= contract.MAX_CLASSES:
        raise ValueError(f"num_classes must be an int in [2, {contract.MAX_CLASSES}], got {num_classes!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'channels_first' or 'channels_last', got {layout!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *positions] ({layout}: see the docstring) with at least 2 dims, "
                         f"got shape {tuple(x.shape)}")
    ch = _channel_dim(layout)
    channels = x.shape[ch]
    if channels not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels (dim {ch} with layout={layout!r}), got {channels} "
                         f"(shape {tuple(x.shape)})")
    expected = contract.num_params(num_mix, channels)
    if params.dim() != x.dim() or params.shape[ch] != expected or \
            [s for i, s in enumerate(params.shape) if i != ch % params.dim()] != \
            [s for i, s in enumerate(x.shape) if i != ch % x.dim()]:
        want = list(x.shape)
        want[ch] = expected
        raise ValueError(f"params must have shape {want} for x of shape {list(x.shape)} with num_mix={num_mix} and "
                         f"layout={layout!r} ({expected} parameters per position: "
                         f"{'3M' if channels == 1 else 'M (1 + 3C)'}), got {list(params.shape)}")


def _check_values(x: torch.Tensor, num_classes: int) -> None:
    """ValueError unless x lies on the data's range (reads a min and a max back to the host)."""
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x.detach())
    if x.dtype.is_floating_point:
        if not (low >= -1.0 and high <= 1.0):  # NaN fails too
            raise ValueError(f"x must lie in [-1, 1] (the grid k / (num_classes - 1) * 2 - 1), got values in "
                             f"[{low.item():.6g}, {high.item():.6g}]{' and NaN' if x.isnan().any() else ''}")
    elif not (low >= 0 and high < num_classes):
        raise ValueError(f"integer x must be class indices in [0, {num_classes}), got values in "
                         f"[{low.item()}, {high.item()}]")


def data_grid(x: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer class indices as floats on the grid k / (num_classes - 1) * 2 - 1; floats as they are."""
    if x.dtype.is_floating_point:
        return x
    return x.to(dtype).mul_(2.0 / (num_classes - 1)).sub_(1.0)  # one new tensor


def discretized_mix_logistic_nll(params: torch.Tensor, x: torch.Tensor, *, num_mix: int, num_classes: int = 256,
                                 layout: str = "channels_first", reduction: str = "batchmean",
                                 backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """Negative log-likelihood (nats) of ``x`` under a discretized mixture of ``num_mix`` logistics.

    ``params`` and ``x`` as in the module docstring (``layout``). ``reduction``: ``"none"`` gives
    ``[B, *positions]`` (each position's NLL, its channels summed: they are coupled),
    ``"per_sample"`` ``[B]``, ``"sum"``, ``"batchmean"`` (sum / B, the ELBO's reconstruction term)
    or ``"mean"`` (sum / x.numel(): nats per dimension; :func:`bits_per_dim` converts). float32
    (float64 for float64 params on the torch backend).

    ``validate`` checks that x lies in [-1, 1] (or that integer x are class indices) before any
    kernel runs, which reads two values back to the host; ``validate=False`` skips it (no host
    synchronisation; out-of-range values are then scored as if clamped to the nearest class), and
    so does tracing by torch.compile. The gradient goes to ``params`` only.
    """
    _check(params, x, num_mix, num_classes, layout)
    check_reduction(reduction)
    device = check_same_device(params=params, x=x)
    resolved = backends.resolve(backend, device, _OP)
    check_floating("params", params, resolved)
    if validate and not torch.compiler.is_compiling():
        _check_values(x, num_classes)
    grid = data_grid(x, num_classes, torch.float64 if params.dtype == torch.float64 else torch.float32)
    if resolved != "torch" and grid.dtype not in contract.KERNEL_DTYPES:
        grid = grid.float()
    spec = DMOLSpec(num_mix, num_classes, layout == "channels_last", reduction, resolved)
    return apply(DMOLFunction, spec, params, grid, torch.is_grad_enabled(), params.requires_grad)[0]


def bits_per_dim(nll: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Nats of a whole observation (e.g. the ``"per_sample"`` NLL, or a negative ELBO) as bits per
    dimension: ``nll / (num_dims · ln 2)``, with ``num_dims`` the observation's values (C·H·W)."""
    return nll / (num_dims * math.log(2.0))


# --------------------------------------------------------------------------- sampling
UNIFORM_MIN = contract.UNIFORM_MIN


def sampler_uniforms(seed: torch.Tensor, positions: int, count: int) -> torch.Tensor:
    """The sampler's uniforms, [positions, count] float32: position n's word w is word w % 4 of the
    Philox block of counter n in stream w // 4 (csrc/common/philox.h's philox_group), as a uniform
    in [0, 1), clamped to [UNIFORM_MIN, 1 - UNIFORM_MIN]."""
    index = torch.arange(positions, dtype=torch.int64, device=seed.device)
    columns = []
    for block in range((count + 3) // 4):
        columns += [philox.uniform(w) for w in philox.philox_group(seed, index, block)]
    return torch.stack(columns[:count], dim=-1).clamp(UNIFORM_MIN, 1.0 - UNIFORM_MIN)


def dmol_sample_reference(params: torch.Tensor, seed: torch.Tensor, num_mix: int, channels: int,
                          channels_last: bool, temperature: float) -> torch.Tensor:
    """A sample of the mixture at every position, in x's layout [B, C, *positions] (channels-first)
    or [B, *positions, C], float32 (float64 for float64 params), in [-1, 1], not rounded to the data
    grid. Component by Gumbel-max over ``logits + temperature * gumbel``, then each channel a
    logistic sample ``mean + temperature * scale * logit(u)`` given the channels before it, clamped
    to [-1, 1]; ``temperature=0`` takes the most likely component and its means. Noise: the
    position's uniforms (:func:`sampler_uniforms`): M for the choice, then one per channel."""
    cdt = _compute_dtype(params.dtype)
    params_cl = (params if channels_last else params.movedim(1, -1)).to(cdt)
    logits, means, log_scales, coeffs = split_params(params_cl, num_mix, channels)
    lead = params_cl.shape[:-1]
    u = sampler_uniforms(seed, lead.numel(), num_mix + channels).to(cdt).reshape(*lead, num_mix + channels)
    gumbel = -torch.log(-torch.log(u[..., :num_mix]))
    choice = torch.argmax(logits + temperature * gumbel, dim=-1, keepdim=True)  # the first of equal maxima

    def chosen(t):  # [..., C, M] -> [..., C]
        return t.gather(-1, choice.unsqueeze(-2).expand(*t.shape[:-1], 1)).squeeze(-1)

    noise = torch.log(u[..., num_mix:]) - torch.log1p(-u[..., num_mix:])  # logistic samples
    spread = temperature * torch.exp(chosen(log_scales).clamp(min=LOG_SCALE_MIN)) * noise
    mean = chosen(means)
    values = []
    for c in range(channels):
        value = mean[..., c] + spread[..., c]
        if c >= 1:
            t = torch.tanh(chosen(coeffs))
            value = value + (t[..., 0] * values[0] if c == 1 else t[..., 1] * values[0] + t[..., 2] * values[1])
        values.append(value.clamp(-1.0, 1.0))
    x = torch.stack(values, dim=-1)
    return x if channels_last else x.movedim(-1, 1)


def discretized_mix_logistic_sample(params: torch.Tensor, *, num_mix: int, channels: int,
                                    layout: str = "channels_first", temperature: float = 1.0,
                                    seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """A sample from the discretized mixture of logistics of ``params`` (laid out as for
    :func:`discretized_mix_logistic_nll`): values in [-1, 1] in x's layout, float32, continuous
    (round them to the data grid with :func:`quantize` for images). ``temperature`` scales the Gumbel
    noise of the choice and the logistic noise (0: the most likely component's means). The same
    ``seed`` gives the same sample on every backend; ``seed=None`` draws one from PyTorch's generator
    for params' device."""
    check_floating("params", params, "torch")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'channels_first' or 'channels_last', got {layout!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(num_mix, bool) or not isinstance(num_mix, int) or num_mix < 1:
        raise ValueError(f"num_mix must be a positive int, got {num_mix!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    philox.check_seed(seed)
    ch = _channel_dim(layout)
    if params.dim() < 2 or params.shape[ch] != contract.num_params(num_mix, channels):
        raise ValueError(f"params must have {contract.num_params(num_mix, channels)} parameters per position in dim "
                         f"{ch} (num_mix={num_mix}, channels={channels}, layout={layout!r}), got shape "
                         f"{list(params.shape)}")
    resolved = backends.resolve(backend, params.device, _OP)
    check_floating("params", params, resolved)
    key = philox.draw_seed(params.device) if seed is None else torch.tensor(seed, dtype=torch.int64,
                                                                             device=params.device)
    with torch.no_grad():
        return backends.plain_op(_OP, "dmol_sample", resolved)(params, key, num_mix, channels,
                                                               layout == "channels_last", float(temperature))


def _torch_sample(params, seed, num_mix, channels, channels_last, temperature):
    """The torch backend of ``dmol_sample``."""
    contract.check_dmol_sample(params, seed, num_mix, channels, channels_last, temperature, dtypes=REFERENCE_DTYPES)
    return dmol_sample_reference(params, seed, num_mix, channels, channels_last, temperature)


def discretized_mix_logistic_mean(params: torch.Tensor, *, num_mix: int, channels: int,
                                  layout: str = "channels_first") -> torch.Tensor:
    """The mixture's mean at every position, in x's layout: sum over components of the component's
    probability times its mean, each channel's mean given the earlier channels at their component
    means (the coupling), clamped to [-1, 1]; differentiable. A summary for pictures (the
    discretization and the clamp of a sample are not modelled)."""
    params_cl = params if layout == "channels_last" else params.movedim(1, -1)
    logits, means, _, coeffs = split_params(params_cl, num_mix, channels)
    component = means
    if coeffs is not None:
        t = torch.tanh(coeffs)
        m0 = means[..., 0, :]
        m1 = means[..., 1, :] + t[..., 0, :] * m0
        m2 = means[..., 2, :] + t[..., 1, :] * m0 + t[..., 2, :] * m1
        component = torch.stack([m0, m1, m2], dim=-2)
    mean = (torch.softmax(logits, -1).unsqueeze(-2) * component).sum(-1).clamp(-1.0, 1.0)
    return mean if layout == "channels_last" else mean.movedim(-1, 1)


def quantize(x: torch.Tensor, num_classes: int = 256) -> torch.Tensor:
    """Values in [-1, 1] rounded to the data grid k / (num_classes - 1) * 2 - 1, as class indices
    (int64): what a sample is as data (``data_grid`` maps them back)."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * (0.5 * (num_classes - 1))).long()


_FAMILY = backends.load_op_family(_OP, {"dmol_forward": _torch_forward, "dmol_sample": _torch_sample},
                                  derivatives={"dmol_forward": reference_derivative(_torch_forward, (0,))})
