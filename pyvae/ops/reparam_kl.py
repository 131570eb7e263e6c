"""Fused reparameterization + KL: ``z = mu + exp(logvar / 2) * eps`` and KL(q || p) in one pass, the
prior p being N(0, I) or a Gaussian N(prior_mu, exp(prior_logvar)) (a hierarchical VAE's layer above,
or a learned per-dimension prior).

Layers of this op (the shape every pyvae op follows):
    kernels   ``csrc/cpu/reparam_kl.cpp``, ``csrc/cuda/reparam_kl.cu``, ``kernels/reparam_kl.py``;
    ops       ``torch.ops.pyvae.reparam_kl_forward/backward`` (C++, CPU and CUDA) and their
              ``*_triton`` twins, each with a fake implementation;
    autograd  :class:`ReparamKLFunction`, which saves only mu, logvar (and the prior) and the seed;
    API       :func:`reparameterize_kl`.

The noise: eps is drawn inside the kernel from counter-based Philox4x32-10 keyed by a 64-bit seed
(stream layout in ``csrc/common/philox.h``); backward regenerates it from the seed. Every backend
draws the same eps for the same seed. :func:`reference_eps` is the float64 oracle of that stream.
"""
from __future__ import annotations

import math

import torch

from .. import backends
from ..kernels.contracts import REFERENCE_DTYPES
from ..kernels.contracts import reparam_kl as contract
from .philox import MASK32, check_seed, draw_seed, philox4x32_10, uniform
from ._common import (apply, check_floating, check_reduction, check_same_device, expand_reduced_grad, reduce_rows,
                      reference_derivative)

__all__ = ["reparameterize_kl", "reparameterize_kl_packed", "ReparamKLFunction", "PackedReparamKLFunction",
           "reference_eps", "reparameterize_kl_reference", "draw_seed"]

_OP = "reparam_kl"


# --------------------------------------------------------------------------- the noise, in PyTorch
def reference_eps(seed: int | torch.Tensor, shape: torch.Size | tuple[int, ...], n_samples: int = 1,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The N(0, 1) noise every backend uses for ``seed``, shape ``(n_samples, *shape)``.

    ``seed`` is an int or a 0-d int64 tensor (e.g. the key a forward call used). Bits and uniforms
    are exact (integer Philox, float32 uniforms); the Box-Muller transform runs in ``dtype``
    (float64 gives the oracle the kernels are tested against).
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
    return torch.ops.pyvae.philox_normal(seed.reshape(()).to(torch.int64), list(shape), n_samples, dtype)


@torch.library.custom_op("pyvae::philox_normal", mutates_args=())
def philox_normal(seed: torch.Tensor, shape: list[int], n_samples: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`reference_eps` of a 0-d int64 key on its device. An opaque op, so that torch.compile
    takes it as one call: traced, the ten integer Philox rounds of a constant seed made Inductor
    run for minutes and take gigabytes (its constant folding and code generation of the unrolled
    rounds)."""
    shape = torch.Size(shape)
    cols = shape[-1]
    rows = shape.numel() // cols if cols else 0
    groups = (cols + 3) // 4
    device = seed.device
    counter = torch.arange(rows * groups, dtype=torch.int64, device=device)
    sample = torch.arange(n_samples, dtype=torch.int64, device=device).view(-1, 1)
    c0 = (counter & MASK32).expand(n_samples, -1)
    c1 = (counter >> 32).expand(n_samples, -1)
    c2 = sample.expand_as(c0)
    words = philox4x32_10(c0, c1, c2, torch.zeros_like(c0), seed & MASK32, (seed >> 32) & MASK32)
    u = [uniform(w) for w in words]
    normals = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(u1.clamp_min(1e-7).to(dtype)))
        theta = (2.0 * math.pi) * u2.to(dtype)
        normals += [radius * torch.cos(theta), radius * torch.sin(theta)]
    eps = torch.stack(normals, dim=-1).reshape(n_samples, rows, 4 * groups)[..., :cols]
    return eps.reshape(n_samples, *shape)


@philox_normal.register_fake
def _(seed, shape, n_samples, dtype):
    return seed.new_empty((n_samples, *shape), dtype=dtype)


# --------------------------------------------------------------------------- the reference
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_LN2 = math.log(2.0)


def _prior_parts(mu_c, logvar_c, prior_mu, prior_logvar, cdt):
    """(x, half_r, s, u) of the KL against N(prior_mu, exp(prior_logvar)), as the kernels form them
    (csrc/common/reparam_kl_math.h): x = logvar - prior_logvar, half_r = exp(x - ln 2) (half the
    variance ratio), s = exp(-(prior_logvar + ln 2) / 2), u = (mu - prior_mu) s (0 where
    mu = prior_mu); KL = u^2 + half_r - (x + 1) / 2. An absent prior tensor means 0."""
    zero = torch.zeros((), dtype=cdt, device=mu_c.device)
    pmu = prior_mu.to(cdt) if prior_mu is not None else zero
    plv = prior_logvar.to(cdt) if prior_logvar is not None else zero
    x, d = logvar_c - plv, mu_c - pmu
    s = torch.exp(-0.5 * (plv + _LN2))
    return x, torch.exp(x - _LN2), s, torch.where(d == 0, zero, d * s)


def reparameterize_kl_reference(mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor, n_samples: int = 1,
                                reduction: str = "per_sample", prior_mu: torch.Tensor | None = None,
                                prior_logvar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain differentiable PyTorch with the eager formulas: the oracle of every backend.

    Computes in float64 for float64 inputs and in float32 otherwise; ``z`` always has shape
    ``(n_samples, *mu.shape)``; ``kl`` is float32 (float64 for float64 inputs). With a prior
    (either tensor, broadcastable to mu; the other then means 0) the KL is against
    N(prior_mu, exp(prior_logvar)), written with the variance ratio exp(logvar - prior_logvar) and
    (mu - prior_mu) exp(-prior_logvar / 2), never a variance alone (which would overflow first), as
    the kernels write it (tests check it against the literal formula and torch.distributions).
    """
    cdt = _compute_dtype(mu.dtype)
    eps = reference_eps(seed, mu.shape, n_samples, cdt, device=mu.device)
    mu_c, logvar_c = mu.to(cdt), logvar.to(cdt)
    z = (mu_c + torch.exp(0.5 * logvar_c) * eps).to(mu.dtype)
    if prior_mu is None and prior_logvar is None:
        kl = -0.5 * (1.0 + logvar_c - mu_c.pow(2) - torch.exp(logvar_c))
    else:
        x, half_r, _, u = _prior_parts(mu_c, logvar_c, prior_mu, prior_logvar, cdt)
        kl = u * u + half_r - 0.5 * (x + 1.0)
    if reduction != "none":
        kl = reduce_rows(kl.sum(-1), reduction, mu.numel())
    return z, kl


def _torch_forward(mu, logvar, seed, n_samples, kl_per_element, prior_mu=None, prior_logvar=None):
    contract.check_reparam_kl_forward(mu, logvar, seed, n_samples, kl_per_element, prior_mu, prior_logvar,
                                      dtypes=REFERENCE_DTYPES)
    seed_used = draw_seed(mu.device) if seed is None else torch.full((), seed, dtype=torch.int64, device=mu.device)
    z, kl = reparameterize_kl_reference(mu, logvar, seed_used, n_samples, "none" if kl_per_element else "per_sample",
                                        prior_mu, prior_logvar)
    return z, kl, seed_used


def _torch_backward(mu, logvar, seed, grad_z, grad_kl, prior_mu=None, prior_logvar=None, prior_mu_grad=False,
                    prior_logvar_grad=False):
    contract.check_reparam_kl_backward(mu, logvar, seed, grad_z, grad_kl, prior_mu, prior_logvar, prior_mu_grad,
                                       prior_logvar_grad, dtypes=REFERENCE_DTYPES)
    cdt = _compute_dtype(mu.dtype)
    mu_c, logvar_c = mu.to(cdt), logvar.to(cdt)
    std = torch.exp(0.5 * logvar_c)
    grad_mu = torch.zeros_like(mu_c)
    grad_logvar = torch.zeros_like(mu_c)
    grad_prior_mu = torch.zeros_like(prior_mu, dtype=cdt) if prior_mu_grad else mu.new_empty(0)
    grad_prior_logvar = torch.zeros_like(prior_logvar, dtype=cdt) if prior_logvar_grad else mu.new_empty(0)
    if grad_z is not None:
        eps = reference_eps(seed, mu.shape, grad_z.shape[0], cdt)
        gz = grad_z.to(cdt)
        grad_mu = grad_mu + gz.sum(0)
        grad_logvar = grad_logvar + 0.5 * std * (gz * eps).sum(0)
    if grad_kl is not None and (prior_mu is not None or prior_logvar is not None):
        gkl = grad_kl.to(cdt)
        _, half_r, s, u = _prior_parts(mu_c, logvar_c, prior_mu, prior_logvar, cdt)
        # (mu - prior_mu) exp(-prior_logvar); 0 for mu = prior_mu also where s overflows (0 * inf)
        d_mu = gkl * torch.where((u == 0) & (s == math.inf), 0.0, 2.0 * (u * s))
        grad_mu = grad_mu + d_mu
        grad_logvar = grad_logvar + gkl * (half_r - 0.5)
        if prior_mu_grad:
            grad_prior_mu = (-d_mu).sum_to_size(prior_mu.shape)
        if prior_logvar_grad:
            grad_prior_logvar = (gkl * (0.5 - half_r - u * u)).sum_to_size(prior_logvar.shape)
    elif grad_kl is not None:
        gkl = grad_kl.to(cdt)
        grad_mu = grad_mu + gkl * mu_c
        grad_logvar = grad_logvar + gkl * 0.5 * (std * std - 1.0)
    return (grad_mu.to(mu.dtype), grad_logvar.to(mu.dtype),
            grad_prior_mu.to(prior_mu.dtype) if prior_mu_grad else grad_prior_mu,
            grad_prior_logvar.to(prior_logvar.dtype) if prior_logvar_grad else grad_prior_logvar)


def _clamp_bounds(logvar_min, logvar_max) -> tuple[float, float]:
    return (-math.inf if logvar_min is None else logvar_min, math.inf if logvar_max is None else logvar_max)


def _torch_packed_forward(params, seed, kl_per_element, logvar_min=None, logvar_max=None):
    contract.check_reparam_kl_packed_forward(params, seed, kl_per_element, logvar_min, logvar_max,
                                             dtypes=REFERENCE_DTYPES)
    mu, logvar = params.unbind(-2)
    if logvar_min is not None or logvar_max is not None:
        logvar = logvar.clamp(logvar_min, logvar_max)  # torch.clamp: NaN stays NaN
    z, kl, seed_used = _torch_forward(mu, logvar, seed, 1, kl_per_element)
    return z[0], kl, seed_used


def _torch_packed_backward(params, seed, grad_z, grad_kl, logvar_min=None, logvar_max=None):
    contract.check_reparam_kl_packed_backward(params, seed, grad_z, grad_kl, logvar_min, logvar_max,
                                              dtypes=REFERENCE_DTYPES)
    mu, logvar = params.unbind(-2)
    clamp = logvar_min is not None or logvar_max is not None
    clamped = logvar.clamp(logvar_min, logvar_max) if clamp else logvar
    grad_mu, grad_logvar, _, _ = _torch_backward(mu, clamped, seed, None if grad_z is None else grad_z.unsqueeze(0),
                                                 grad_kl)
    if clamp:  # torch.clamp's gradient: passed where logvar_min <= logvar <= logvar_max
        lo, hi = _clamp_bounds(logvar_min, logvar_max)
        grad_logvar = torch.where((logvar >= lo) & (logvar <= hi), grad_logvar, 0.0)
    return torch.stack([grad_mu, grad_logvar], dim=-2)


# --------------------------------------------------------------------------- autograd
class ReparamKLFunction(torch.autograd.Function):
    """``(z, kl, seed_used) = ReparamKLFunction.apply(mu, logvar, seed, n_samples, reduction, backend,
    prior_mu, prior_logvar)``.

    ``seed`` is an int or None (drawn from PyTorch's generator for the device); ``backend`` a
    concrete backend name (see :mod:`pyvae.backends`); ``prior_mu`` / ``prior_logvar`` None or
    tensors of mu's dtype and device that broadcast to mu (the KL is then against that Gaussian).
    ``seed_used`` is the 0-d int64 key the noise was drawn with (no gradient).
    Saves only ``mu``, ``logvar``, the prior tensors given and that key, from which backward
    regenerates eps (the backend's backward op, which also returns the prior's gradients, summed
    over its broadcast dims). The backward op has a derivative of its own, so second- and
    higher-order gradients are exact; under ``torch.func.vmap`` each slice is computed as one call
    would be (the same ``seed`` draws the same noise for every slice, as in a loop; with
    ``seed=None`` vmap's ``randomness`` decides: ``"different"`` keys, ``"same"`` key, or an error).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, seed: int | None, n_samples: int, reduction: str, backend: str,
                prior_mu=None, prior_logvar=None):
        forward_op = backends.plain_op(_OP, "reparam_kl_forward", backend)
        if prior_mu is None and prior_logvar is None:
            z, kl, seed_used = forward_op(mu, logvar, seed, n_samples, reduction == "none")
        else:
            z, kl, seed_used = forward_op(mu, logvar, seed, n_samples, reduction == "none", prior_mu, prior_logvar)
        if reduction not in ("none", "per_sample"):
            kl = reduce_rows(kl, reduction, mu.numel())
        return (z[0] if n_samples == 1 else z), kl, seed_used

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, _, n_samples, reduction, backend, *priors = inputs
        prior_mu, prior_logvar = (*priors, None, None)[:2]
        seed_used = output[2]
        ctx.mark_non_differentiable(seed_used)
        ctx.save_for_backward(mu, logvar, seed_used, *(t for t in (prior_mu, prior_logvar) if t is not None))
        ctx.has_prior = prior_mu is not None, prior_logvar is not None
        ctx.n_samples, ctx.reduction, ctx.backend = n_samples, reduction, backend
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_z, grad_kl, _grad_seed):
        mu, logvar, seed, *priors = ctx.saved_tensors
        prior_mu = priors.pop(0) if ctx.has_prior[0] else None
        prior_logvar = priors.pop(0) if ctx.has_prior[1] else None
        backward_op = backends.op_in_backward(_OP, "reparam_kl_backward", ctx.backend)
        if grad_z is not None:
            grad_z = (grad_z.unsqueeze(0) if ctx.n_samples == 1 else grad_z).to(mu.dtype)
        if grad_kl is not None:
            samples = mu.numel() // mu.shape[-1] if mu.shape[-1] else 0
            grad_kl = expand_reduced_grad(grad_kl, ctx.reduction, mu.shape, samples)
            if ctx.backend != "torch":
                grad_kl = grad_kl.float()
        if prior_mu is None and prior_logvar is None:
            grad_mu, grad_logvar, *_ = backward_op(mu, logvar, seed, grad_z, grad_kl)
            return grad_mu, grad_logvar, None, None, None, None, None, None
        # the prior's gradients come only from the KL
        needs = ctx.needs_input_grad[6:] + (False, False)  # apply may have been given 6, 7 or 8 inputs
        wanted = (grad_kl is not None and prior_mu is not None and needs[0],
                  grad_kl is not None and prior_logvar is not None and needs[1])
        grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar = backward_op(
            mu, logvar, seed, grad_z, grad_kl, prior_mu, prior_logvar, *wanted)
        return (grad_mu, grad_logvar, None, None, None, None, grad_prior_mu if wanted[0] else None,
                grad_prior_logvar if wanted[1] else None)


class PackedReparamKLFunction(torch.autograd.Function):
    """``(z, kl, seed_used) = PackedReparamKLFunction.apply(params, dim, seed, reduction, backend,
    logvar_min, logvar_max)`` for ``params`` ``[..., 2 Z, ...]`` holding mu, then logvar, along
    ``dim`` (non-negative): one sample, the KL against N(0, I), the log-variance clamped to
    ``[logvar_min, logvar_max]`` (None: that side unclamped). ``z`` has ``params``' shape with
    ``dim`` halved; ``kl`` is shaped by ``reduction`` as :func:`reparameterize_kl_packed` returns it.
    The op sees ``params`` as ``[rows, 2, cols]``; the reshapes happen in here, so that autograd
    records no view nodes around the call (three fewer nodes to build and run). Saves only
    ``params`` and the key; backward regenerates eps and returns the gradient of ``params`` as one
    tensor (the backend's packed backward op, with a derivative of its own: higher-order gradients
    are exact)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(params, dim: int, seed: int | None, reduction: str, backend: str, logvar_min, logvar_max):
        forward_op = backends.plain_op(_OP, "reparam_kl_packed_forward", backend)
        shape = params.shape
        latent = (*shape[:dim], shape[dim] // 2, *shape[dim + 1:])
        rows, cols = math.prod(shape[:dim]), math.prod(latent[dim:])
        z, kl, seed_used = forward_op(params.reshape(rows, 2, cols), seed, reduction == "none", logvar_min, logvar_max)
        if reduction == "none":
            kl = kl.view(latent)
        elif reduction == "per_sample":
            kl = kl.view(shape[:dim])
        else:
            kl = reduce_rows(kl, reduction, z.numel())
        return z.view(latent), kl, seed_used

    @staticmethod
    def setup_context(ctx, inputs, output):
        params, dim, _, reduction, backend, logvar_min, logvar_max = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(params, output[2])
        ctx.dim, ctx.reduction, ctx.backend, ctx.bounds = dim, reduction, backend, (logvar_min, logvar_max)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_z, grad_kl, _grad_seed):
        params, seed = ctx.saved_tensors
        shape, dim = params.shape, ctx.dim
        rows, cols = math.prod(shape[:dim]), shape[dim] // 2 * math.prod(shape[dim + 1:])
        if grad_z is not None:
            grad_z = grad_z.reshape(rows, cols)
            if grad_z.dtype != params.dtype:
                grad_z = grad_z.to(params.dtype)
        if grad_kl is not None:
            if ctx.reduction == "none":
                grad_kl = grad_kl.reshape(rows, cols)
            elif ctx.reduction == "per_sample":
                grad_kl = grad_kl.reshape(rows, 1).expand(rows, cols)
            else:
                grad_kl = expand_reduced_grad(grad_kl, ctx.reduction, torch.Size((rows, cols)), rows)
            if ctx.backend != "torch" and grad_kl.dtype != torch.float32:
                grad_kl = grad_kl.float()
        backward_op = backends.op_in_backward(_OP, "reparam_kl_packed_backward", ctx.backend)
        grad = backward_op(params.reshape(rows, 2, cols), seed, grad_z, grad_kl, *ctx.bounds)
        return grad.view(shape), None, None, None, None, None, None


# --------------------------------------------------------------------------- the ops' own derivatives
# Registered on the C++ ops and their Triton twins (pyvae.backends.load_op_family), so that a
# backward taken with create_graph=True is itself differentiable: the forward op's derivative is the
# backward op of the same backend; the backward op's, the derivative of its reference.
def _forward_op_setup_context(ctx, inputs, output):
    mu, logvar, _, _, kl_per_element, *priors = inputs
    prior_mu, prior_logvar = (*priors, None, None)[:2]
    ctx.save_for_backward(mu, logvar, output[2], prior_mu, prior_logvar)
    ctx.kl_per_element = kl_per_element


def _forward_op_backward(backend: str):
    def backward(ctx, grad_z, grad_kl, _grad_seed):
        mu, logvar, seed, prior_mu, prior_logvar = ctx.saved_tensors
        if grad_kl is not None:
            grad_kl = (grad_kl if ctx.kl_per_element else grad_kl.unsqueeze(-1)).float().expand(mu.shape)
        wanted = (grad_kl is not None and prior_mu is not None and ctx.needs_input_grad[5],
                  grad_kl is not None and prior_logvar is not None and ctx.needs_input_grad[6])
        grads = backends.op_in_backward(_OP, "reparam_kl_backward", backend)(
            mu, logvar, seed, grad_z.to(mu.dtype) if grad_z is not None else None, grad_kl, prior_mu, prior_logvar,
            *wanted)
        return (grads[0], grads[1], None, None, None, grads[2] if wanted[0] else None,
                grads[3] if wanted[1] else None)
    return backward


def _forward_op_vmap_rule(backend: str):
    """The forward op under vmap: one call per slice (see :class:`ReparamKLFunction` for the noise);
    with ``seed=None`` the randomness vmap was asked for decides."""
    def rule(info, in_dims, mu, logvar, seed, n_samples, kl_per_element, prior_mu=None, prior_logvar=None):
        if seed is None and info.randomness == "error":
            raise RuntimeError("vmap: pyvae.reparameterize_kl draws random noise (seed=None): pass a seed, or call "
                               "torch.func.vmap with randomness='different' or 'same'")
        if seed is None and info.randomness == "same":
            device = (mu if isinstance(mu, torch.Tensor) else logvar).device
            seed = int(draw_seed(device))  # one key for every slice (reads it back to the host)
        args = (mu, logvar, seed, n_samples, kl_per_element, prior_mu, prior_logvar)
        return backends.map_slices(_FAMILY.op("reparam_kl_forward", backend), info.batch_size, args,
                                   (*in_dims, None, None)[:7])
    return rule


def _packed_forward_op_setup_context(ctx, inputs, output):
    params, _, kl_per_element, logvar_min, logvar_max = (*inputs, None, None)[:5]
    ctx.save_for_backward(params, output[2])
    ctx.kl_per_element, ctx.bounds = kl_per_element, (logvar_min, logvar_max)


def _packed_forward_op_backward(backend: str):
    def backward(ctx, grad_z, grad_kl, _grad_seed):
        params, seed = ctx.saved_tensors
        latent = (*params.shape[:-2], params.shape[-1])
        if grad_kl is not None:
            grad_kl = (grad_kl if ctx.kl_per_element else grad_kl.unsqueeze(-1)).float().expand(latent)
        grad = backends.op_in_backward(_OP, "reparam_kl_packed_backward", backend)(
            params, seed, grad_z.to(params.dtype) if grad_z is not None else None, grad_kl, *ctx.bounds)
        return grad, None, None, None, None
    return backward


def _packed_forward_op_vmap_rule(backend: str):
    """The packed forward op under vmap: one call per slice, the noise as for :func:`_forward_op_vmap_rule`."""
    def rule(info, in_dims, params, seed, kl_per_element, logvar_min=None, logvar_max=None):
        if seed is None and info.randomness == "error":
            raise RuntimeError("vmap: pyvae.reparameterize_kl_packed draws random noise (seed=None): pass a seed, "
                               "or call torch.func.vmap with randomness='different' or 'same'")
        if seed is None and info.randomness == "same":
            seed = int(draw_seed(params.device))  # one key for every slice (reads it back to the host)
        args = (params, seed, kl_per_element, logvar_min, logvar_max)
        return backends.map_slices(_FAMILY.op("reparam_kl_packed_forward", backend), info.batch_size, args,
                                   (*in_dims, None, None)[:5])
    return rule


# --------------------------------------------------------------------------- API
def _check_prior(name: str, prior, mu: torch.Tensor) -> None:
    """TypeError / ValueError naming the argument unless ``prior`` is None or a floating tensor on
    mu's device that broadcasts to mu's shape."""
    if prior is None:
        return
    if not isinstance(prior, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor, got {type(prior).__name__}")
    if not prior.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {prior.dtype}")
    if prior.device != mu.device:
        raise ValueError(f"{name} is on {prior.device} but mu is on {mu.device}: all inputs must share one device")
    try:
        broadcasts = prior.dim() <= mu.dim() and torch.broadcast_shapes(prior.shape, mu.shape) == mu.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"{name} of shape {tuple(prior.shape)} does not broadcast to mu's shape {tuple(mu.shape)}")


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, *, prior_mu: torch.Tensor | None = None,
                      prior_logvar: torch.Tensor | None = None, n_samples: int = 1,
                      seed: int | None = None, reduction: str = "per_sample",
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``z ~ N(mu, exp(logvar))`` by reparameterization and return it with KL(q || p), p being
    N(0, I) or the Gaussian prior N(prior_mu, exp(prior_logvar)).

    Args:
        mu, logvar: tensors of the same shape ``[..., Z]`` (at least 1-D) on one device, float32,
            float16 or bfloat16 (float64 on ``backend="torch"``). Different floating dtypes are
            promoted to a common one, as eager arithmetic would (e.g. under ``torch.autocast``).
        prior_mu, prior_logvar: the prior's mean and log-variance: ``None`` (both: the standard
            normal, exactly as without these arguments) or floating tensors on mu's device that
            broadcast to mu's shape: a full ``[..., Z]`` tensor (a hierarchical VAE's layer above),
            a learned per-dimension prior ``[Z]`` or ``[1, Z]``, ... Either may be given alone (the
            other then means 0). They are cast to mu's dtype (their gradients come back in their own
            dtype) and read in place: a broadcast prior is never expanded to mu's size in forward.
        n_samples: draws per input; ``z`` gets a leading dimension of this size when it is > 1.
        seed: ``None`` draws the key from PyTorch's generator for the device (so ``torch.manual_seed``
            makes runs repeatable; no host synchronisation; fresh noise on every CUDA-graph replay;
            on the cuda backend the kernel reads the generator state itself: one launch);
            an int in ``[0, 2**63 - 1]`` fixes the noise. The same seed gives the same eps on every
            backend.
        reduction: of the KL term: ``"none"`` (``[..., Z]``), ``"per_sample"`` (``[...]``: sum over
            the last dim), ``"sum"`` (scalar), ``"batchmean"`` (sum / number of samples, i.e. the
            ELBO's KL per sample) or ``"mean"`` (sum / number of elements).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see :mod:`pyvae.backends`).

    Returns:
        ``(z, kl)``: ``z = mu + exp(logvar / 2) * eps`` of shape ``mu.shape`` (or
        ``(n_samples, *mu.shape)``) in mu's dtype; ``kl = -0.5 (1 + logvar - mu^2 - exp(logvar))``
        against N(0, I), or with a prior
        ``kl = 0.5 (prior_logvar - logvar + (exp(logvar) + (mu - prior_mu)^2) / exp(prior_logvar) - 1)``,
        reduced as asked, in float32 (float64 for float64 inputs). Empty batches give empty ``z``;
        their ``sum`` is 0 and ``batchmean``/``mean`` are NaN, as ``torch.mean`` of nothing.
        The prior changes only the KL: the same seed draws the same eps with or without one.

    The KL against a prior is evaluated as ``0.5 (r - x - 1) + 0.5 ((mu - prior_mu) exp(-prior_logvar / 2))^2``
    with ``x = logvar - prior_logvar`` and ``r = exp(x)`` (the kernels fold the halves into the
    exponentials: ``r / 2 = exp(x - ln 2)``), never exp(logvar) / exp(prior_logvar): it stays finite
    wherever the KL itself is, e.g. for logvar = prior_logvar = 100 (where the literal formula gives
    inf / inf) or logvar - prior_logvar = 89 in float32.

    NaN and Inf propagate as in the eager formulas, on every backend: a NaN in mu or logvar makes
    that element's z and KL NaN; logvar = +inf gives z = +-inf and KL NaN (inf - inf);
    logvar = -inf gives z = mu and KL = +inf. With a prior, the KL is NaN or inf where the formula
    above is (in exact arithmetic, then rounded to float32): a NaN anywhere, or inf - inf.

    Gradients flow to ``mu`` and ``logvar``: ``dmu = dz + dkl * mu``,
    ``dlogvar = dz * 0.5 exp(logvar / 2) eps + dkl * 0.5 (exp(logvar) - 1)``, summed over samples.
    With a prior (``r``, ``x`` as above, ``d = mu - prior_mu``, ``w = exp(-prior_logvar)``):
    ``dmu = dz + dkl * d w``, ``dlogvar = dz * 0.5 exp(logvar / 2) eps + dkl * 0.5 (r - 1)``,
    ``dprior_mu = -dkl * d w``, ``dprior_logvar = dkl * 0.5 (1 - r - d^2 w)``, the prior's summed
    over the dims where it broadcasts, all in the one backward pass.
    """
    if not isinstance(mu, torch.Tensor) or not isinstance(logvar, torch.Tensor):
        check_floating("mu", mu, "torch")
        check_floating("logvar", logvar, "torch")
    check_reduction(reduction)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if mu.dim() == 0:
        raise ValueError("mu must have at least one dimension [..., Z], got a 0-d tensor")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    device = check_same_device(mu=mu, logvar=logvar)
    resolved = backends.resolve(backend, device, _OP)
    check_floating("mu", mu, resolved)
    check_floating("logvar", logvar, resolved)
    _check_prior("prior_mu", prior_mu, mu)
    _check_prior("prior_logvar", prior_logvar, mu)
    if mu.dtype != logvar.dtype:
        common = torch.promote_types(mu.dtype, logvar.dtype)
        mu, logvar = mu.to(common), logvar.to(common)
    check_seed(seed)
    if prior_mu is None and prior_logvar is None:
        # every argument passed: torch.compile (2.13) binds its context to the first argument of a
        # forward called with fewer arguments than it has parameters
        return apply(ReparamKLFunction, mu, logvar, seed, n_samples, reduction, resolved, None, None)[:2]
    prior_mu = prior_mu.to(mu.dtype) if prior_mu is not None else None
    prior_logvar = prior_logvar.to(mu.dtype) if prior_logvar is not None else None
    return apply(ReparamKLFunction, mu, logvar, seed, n_samples, reduction, resolved, prior_mu, prior_logvar)[:2]


def _check_bound(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be None or a float, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def reparameterize_kl_packed(params: torch.Tensor, *, dim: int = -1, logvar_min: float | None = None,
                             logvar_max: float | None = None, seed: int | None = None,
                             reduction: str = "per_sample", backend: str = "auto"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reparameterize_kl` of an encoder output that holds the mean and the log-variance in
    one tensor, as ``mu, logvar = params.chunk(2, dim)``, with the log-variance optionally clamped
    first (``logvar.clamp(logvar_min, logvar_max)``, as Stable Diffusion's posterior clamps it to
    [-30, 20]). One sample; the KL against N(0, I).

    What it saves over chunking and calling :func:`reparameterize_kl`: the clamp is done inside the
    kernel (no clamped copy of the log-variance, written forward and kept for backward), and backward
    writes the gradient of ``params`` as one tensor (no ``torch.cat`` of the two halves' gradients,
    which is what chunk's backward does). Only ``params`` and the Philox key are kept for backward.

    Args:
        params: ``[..., 2 Z_dim, ...]``: mean then log-variance along ``dim`` (float32, float16 or
            bfloat16; float64 on ``backend="torch"``).
        dim: the dim they are stacked along (its size must be even).
        logvar_min, logvar_max: the clamp's bounds (None: that side unclamped); its gradient is
            torch.clamp's: passed where ``logvar_min <= logvar <= logvar_max``, else 0.
        seed, backend: as in :func:`reparameterize_kl`.
        reduction: of the KL: ``"none"`` (z's shape), ``"per_sample"`` (summed over ``dim`` and the
            dims after it: ``params.shape[:dim]``), ``"sum"``, ``"batchmean"`` (the sum divided by the
            number of samples, ``prod(params.shape[:dim])``) or ``"mean"`` (by z's element count).

    Returns:
        ``(z, kl)``: ``z`` of ``params``' shape with ``dim`` halved, in its dtype; ``kl`` in float32
        (float64 for float64 params). NaN and Inf as in :func:`reparameterize_kl`, after the clamp
        (which keeps NaN); a NaN log-variance gets no gradient through the clamp (torch.clamp's).
    """
    if not isinstance(params, torch.Tensor):
        check_floating("params", params, "torch")
    check_reduction(reduction)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if params.dim() == 0:
        raise ValueError("params must have at least one dimension, got a 0-d tensor")
    if not -params.dim() <= dim < params.dim():
        raise ValueError(f"dim {dim} is out of range for params of {params.dim()} dims")
    dim %= params.dim()
    if params.shape[dim] % 2:
        raise ValueError(f"params must have an even size along dim {dim} (mean and log-variance), got "
                         f"{tuple(params.shape)}")
    lo, hi = _check_bound("logvar_min", logvar_min), _check_bound("logvar_max", logvar_max)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"logvar_min must be <= logvar_max, got {lo} and {hi}")
    resolved = backends.resolve(backend, params.device, _OP)
    check_floating("params", params, resolved)
    check_seed(seed)
    z, kl, _ = apply(PackedReparamKLFunction, params, dim, seed, reduction, resolved, lo, hi)
    return z, kl


_FAMILY = backends.load_op_family(
    _OP, {"reparam_kl_forward": _torch_forward, "reparam_kl_backward": _torch_backward,
          "reparam_kl_packed_forward": _torch_packed_forward, "reparam_kl_packed_backward": _torch_packed_backward},
    derivatives={"reparam_kl_forward": (_forward_op_setup_context, _forward_op_backward),
                 "reparam_kl_backward": reference_derivative(_torch_backward, (0, 1, 3, 4, 5, 6)),
                 "reparam_kl_packed_forward": (_packed_forward_op_setup_context, _packed_forward_op_backward),
                 "reparam_kl_packed_backward": reference_derivative(_torch_packed_backward, (0, 2, 3))},
    vmap_rules={"reparam_kl_forward": _forward_op_vmap_rule,
                "reparam_kl_packed_forward": _packed_forward_op_vmap_rule})
philox_normal.register_vmap(backends.loop_vmap_rule("philox_normal"))
