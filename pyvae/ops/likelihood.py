"""Fused reconstruction likelihoods: Bernoulli, Gaussian and continuous Bernoulli NLLs.

Layers of this op family (the shape every pyvae op follows):
    kernels   ``csrc/cpu/likelihood.cpp``, ``csrc/cuda/likelihood.cu``, ``kernels/likelihood.py``;
              per-element formulas in ``csrc/common/likelihood_math.h``;
    ops       ``torch.ops.pyvae.likelihood_forward`` (C++, CPU and CUDA) and its ``_triton`` twin,
              each with a fake implementation;
    autograd  :class:`LikelihoodFunction`: forward reads prediction and target once and writes the
              per-sample sums (no per-element loss unless ``reduction="none"``) and, when autograd
              will need it, the gradient of the reduced loss at a unit upstream gradient (the
              reduction's 1/B or 1/numel folded in). Backward scales that buffer in place by the
              upstream gradient, and for a scalar loss skips even that pass when the upstream is 1
              (``loss.backward()``, or a sum of losses): the ``scale_grad_`` ops read the scale on
              the device, so there is no host synchronisation. Forward+backward then moves the
              minimum (read prediction and target, write the gradient), where recomputing in
              backward would read the inputs twice and evaluate the transcendental functions twice.
              Backward keeps references to the inputs (no copies, nothing computed from them), so
              that a backward with ``create_graph=True`` can recompute the gradients as
              differentiable functions (the op's registered derivative gives the next order): exact
              second- and higher-order gradients on every backend. Peak memory: the inputs plus one
              gradient buffer (a log-variance shared by the batch gets its gradient
              as sums over groups of ``LOGVAR_GROUP_ROWS`` rows, for scalar losses). A backward with
              ``retain_graph=True`` scales a copy and keeps the buffer, so a second backward
              through the same graph returns bit-identical gradients.
    API       :func:`bernoulli_nll`, :func:`gaussian_nll`, :func:`continuous_bernoulli_nll`.

Inputs are ``[B, ...]``: ``reduction="per_sample"`` sums over all dims but the first (the
per-sample negative log-likelihood of the whole observation), ``"batchmean"`` (the default) is the
total divided by B, i.e. the reconstruction term of the ELBO per sample; ``"none"``, ``"sum"`` and
``"mean"`` keep their usual meanings.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch

from .. import backends
from .._constants import LikelihoodFlag
from ..kernels.contracts import REFERENCE_DTYPES
from ..kernels.contracts import likelihood as contract
from ..kernels.contracts.likelihood import logvar_group_rows
from ._common import (apply, check_floating, check_reduction, check_same_device, expand_reduced_grad, reduce_rows,
                      reference_derivative)

__all__ = ["bernoulli_nll", "gaussian_nll", "continuous_bernoulli_nll", "LikelihoodFlag", "LikelihoodFunction",
           "LikelihoodSpec", "likelihood_reference"]

_OP = "likelihood"
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
LOSSES = contract.LOSSES


# --------------------------------------------------------------------------- the reference
class _LimitProduct(torch.autograd.Function):
    """``a * b`` with ``0 * ±inf = 0``, in the derivatives ``(g b, g a)`` too (a product of the same
    kind): the Bernoulli losses' ``c * l`` at an infinite logit ``l``, whose limit is 0 where
    ``c = 0``, while d/dc stays ``l``. A branch that ``torch.where`` discards (upstream gradient 0)
    then gives 0, not ``0 * inf = NaN``. NaN stays NaN."""
    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        zero = ((a == 0) & b.isinf()) | ((b == 0) & a.isinf())
        return torch.where(zero, 0.0, a * b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return (_limit_product(grad, b).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None,
                _limit_product(grad, a).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None)


def _limit_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _LimitProduct.apply(a, b)


def _limit_coefficient(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """c of the Bernoulli losses at an infinite logit l, where they are c * l + (0, or -log|l| + o(1)
    for the continuous Bernoulli): 1 - t at +inf, -t at -inf (softplus(l) - t l = (1 - t) l + o(1), resp.
    -t l + o(1))."""
    return torch.where(p > 0, 1.0 - t, -t)


def _cb_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C of the continuous Bernoulli in terms of the logit l: log(l / tanh(l / 2)); Taylor near 0,
    +inf at ±inf."""
    a = logits.abs()
    small = a < 0.25
    z = torch.where(small, logits, 0.0) ** 2  # each branch sees only its own inputs: finite derivatives
    series = math.log(2.0) + z * (1.0 / 12.0 + z * (-7.0 / 1440.0 + z * (31.0 / 90720.0)))
    safe = torch.where(small, 1.0, a)
    e = torch.exp(-safe)
    direct = torch.log(safe) - torch.log1p(-e) + torch.log1p(e)
    return torch.where(small, series, direct)


def likelihood_reference(loss: str, pred: torch.Tensor, target: torch.Tensor, logvar: torch.Tensor | None = None,
                         fixed_logvar: float = 0.0, constant: float = 0.0) -> torch.Tensor:
    """Per-element negative log-likelihood in plain differentiable PyTorch (float64 for float64
    inputs, else float32): the oracle of every backend. Values and first derivatives follow the
    README's rules for non-finite inputs: at an infinite logit the Bernoulli losses take their limit
    (``_limit_coefficient``); a Gaussian log-variance of -inf gives +inf where target != mean."""
    cdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p, t = pred.to(cdt), target.to(cdt)
    if loss in ("bernoulli", "continuous_bernoulli"):
        infinite = p.isinf()
        finite_p = torch.where(infinite, 0.0, p)  # the finite branch never sees inf (nor its derivatives)
        c_l = _limit_product(_limit_coefficient(p, t), p)  # (softplus(l) - t l) at l = ±inf
        if loss == "bernoulli":
            return torch.where(infinite, c_l, torch.nn.functional.softplus(finite_p) - t * finite_p)
        # continuous Bernoulli: c l - log|l| + o(1) at l = ±inf, so +inf where c l is, else -inf
        log_l = torch.log(torch.where(infinite, p.abs(), 1.0))
        at_inf = torch.where(c_l == math.inf, c_l, c_l - log_l)
        return torch.where(infinite, at_inf, torch.nn.functional.softplus(finite_p) - t * finite_p
                           - _cb_log_norm(finite_p))
    v = logvar.to(cdt) if logvar is not None else torch.full((), fixed_logvar, dtype=cdt, device=p.device)
    # logvar = -inf: the variance is 0, as for any logvar whose exp(-logvar) overflows: +inf where t != m
    # (without the clamp, inf - inf = NaN), NaN where t == m (0 * inf)
    return 0.5 * ((t - p) ** 2 * torch.exp(-v) + v.clamp(min=-torch.finfo(cdt).max)) + constant


# --------------------------------------------------------------------------- backends
def _torch_forward(loss, pred, target, logvar, fixed_logvar, constant, flags, grad_scale):
    """The torch backend of the likelihood op: its signature and outputs (a batch-shared
    log-variance's derivatives summed over row groups, as the kernels return them). Differentiable
    (its gradients too, when grad mode is on: this is the op's derivative, see the registration)."""
    contract.check_likelihood_forward(loss, pred, target, logvar, fixed_logvar, constant, flags, grad_scale,
                                      dtypes=REFERENCE_DTYPES)
    values = likelihood_reference(loss, pred, target, logvar, fixed_logvar, constant).expand(pred.shape)
    per_element = bool(flags & LikelihoodFlag.PER_ELEMENT)
    out = values if per_element else values.reshape(pred.shape[0], math.prod(pred.shape[1:])).sum(1)
    wanted = [bool(flags & bit) for bit in LikelihoodFlag.GRADS]
    if not any(wanted):
        return out, []
    positions = [i for i, want in enumerate(wanted) if want]
    logvar_full = logvar.expand(pred.shape) if logvar is not None else None

    def total(p, t, v):
        return likelihood_reference(loss, p, t, v, fixed_logvar).expand(pred.shape).sum() * grad_scale

    # torch.func.grad, not torch.autograd.grad: it runs under no_grad (inside an autograd Function's
    # forward), stays differentiable under grad mode (this is also the op's derivative, see the
    # registration) and composes with torch.func transforms
    grads = list(torch.func.grad(total, argnums=tuple(positions))(pred, target, logvar_full))
    logvar_grad_dtype = torch.promote_types(torch.float32, pred.dtype)  # float32, float64 for float64 inputs
    dtypes = [d for d, want in zip((pred.dtype, target.dtype, logvar_grad_dtype), wanted) if want]
    grads = [g.to(dtype) for g, dtype in zip(grads, dtypes)]
    if wanted[2]:
        grads[-1] = _sum_row_groups(grads[-1], logvar_group_rows(pred, logvar, flags))
    return out, grads


def _sum_row_groups(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, ...] -> [ceil(B / group), ...]: sums of consecutive groups of ``group`` rows."""
    if group == 1:
        return t
    groups = -(-t.shape[0] // group)
    cols = math.prod(t.shape[1:])
    padded = torch.nn.functional.pad(t.reshape(t.shape[0], cols), (0, 0, 0, groups * group - t.shape[0]))
    return padded.reshape(groups, group, cols).sum(1).reshape(groups, *t.shape[1:])


def _torch_scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    if not torch.compiler.is_compiling():  # (is_contiguous cannot be traced in a compiled backward)
        contract.check_scale_grad_(grad, scale, dtypes=REFERENCE_DTYPES)
    grad.mul_(scale)


def _scale_grad_(grad: torch.Tensor, scale: torch.Tensor, backend: str) -> None:
    """grad *= scale (one float32 value), skipped on the device when it is 1."""
    backends.plain_op(_OP, "scale_grad_", backend)(grad, scale)


_SCALAR_REDUCTIONS = ("sum", "batchmean", "mean")  # one upstream gradient value for every element


def _grad_scale(reduction: str, shape: torch.Size) -> float:
    """The factor the reduction applies to every element's gradient."""
    if reduction == "batchmean" and shape[0] > 0:
        return 1.0 / shape[0]
    if reduction == "mean" and shape.numel() > 0:
        return 1.0 / shape.numel()
    return 1.0


def _kernel_grad_scale(reduction: str, shape: torch.Size) -> float:
    """The factor the forward kernel folds into its unit gradients: the reduction's, except under
    torch.compile, where a float argument computed from the batch size would make the compiled graph
    specialise on that size (backward then multiplies the upstream gradient by it instead)."""
    return 1.0 if torch.compiler.is_compiling() else _grad_scale(reduction, shape)


def _op_flags(reduction: str, wanted: list[bool]) -> int:
    """The forward op's flags for this reduction and the wanted gradients (of pred, target, logvar).
    A scalar loss gives every row the same upstream gradient, so a log-variance shared by the batch
    can have its gradient summed over row groups in the kernel."""
    flags = LikelihoodFlag.PER_ELEMENT if reduction == "none" else 0
    flags |= LikelihoodFlag.GROUP_LOGVAR_GRAD if reduction in _SCALAR_REDUCTIONS else 0
    for bit, want in zip(LikelihoodFlag.GRADS, wanted):
        flags |= bit if want else 0
    return flags


def _forward_op(backend: str):
    return backends.plain_op(_OP, "likelihood_forward", backend)


# --------------------------------------------------------------------------- autograd
class LikelihoodSpec(NamedTuple):
    """What one :class:`LikelihoodFunction` computes: the negative log-likelihood ``loss`` (one of
    :data:`LOSSES`) with ``reduction``, on ``backend`` (a concrete one, not "auto"). Without a
    logvar tensor every element uses ``fixed_logvar``; ``constant`` is added per element."""
    loss: str
    reduction: str
    backend: str
    fixed_logvar: float = 0.0
    constant: float = 0.0


class LikelihoodFunction(torch.autograd.Function):
    """``nll, *unit_grads = LikelihoodFunction.apply(spec, pred, target, logvar, grad_mode, needs_grad)``:
    ``spec`` a :class:`LikelihoodSpec`, ``logvar`` a tensor broadcastable to ``pred`` (Gaussian) or
    None, ``grad_mode`` being ``torch.is_grad_enabled()`` where the caller is, ``needs_grad`` whether
    pred, target and logvar need a gradient (default: their ``requires_grad``, which is not what a
    ``torch.func`` transform differentiates: pass it). ``unit_grads`` (of pred, target, logvar; None
    where not needed) are the forward op's gradient buffers at a unit upstream gradient, which
    backward scales in place: the caller drops them.

    Gradients flow to ``pred``, ``target`` and ``logvar`` (reduced over its broadcast dims). The
    inputs are kept (references, no copies) for a backward with ``create_graph=True``, which
    recomputes the gradients through the op's own derivative, so that second- and higher-order
    gradients are exact; ``torch.func`` transforms work as on PyTorch's own losses.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(spec: LikelihoodSpec, pred, target, logvar, grad_mode=True, needs_grad=None):
        if needs_grad is None:  # (under torch.func transforms the caller must tell: see _apply)
            needs_grad = (pred.requires_grad, target.requires_grad, logvar is not None and logvar.requires_grad)
        wanted = [grad_mode and need for need in needs_grad]
        out, unit_grads = _forward_op(spec.backend)(spec.loss, pred, target, logvar, spec.fixed_logvar,
                                                    spec.constant, _op_flags(spec.reduction, wanted),
                                                    _kernel_grad_scale(spec.reduction, pred.shape))
        if spec.reduction not in ("none", "per_sample"):
            out = reduce_rows(out, spec.reduction, pred.numel())
        remaining = iter(unit_grads)
        return (out, *(next(remaining) if want else None for want in wanted))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, pred, target, logvar, *_ = inputs
        # Kept as attributes, not saved tensors: backward scales them in place (see the module
        # docstring). One entry per input, None where no gradient was asked for.
        ctx.unit_grads = list(output[1:])
        ctx.mark_non_differentiable(*(g for g in output[1:] if g is not None))
        ctx.save_for_backward(pred, target, logvar)
        ctx.spec = spec
        # the part of the reduction's factor the kernel did not fold in (see _kernel_grad_scale)
        ctx.upstream_scale = _grad_scale(spec.reduction, pred.shape) / _kernel_grad_scale(spec.reduction, pred.shape)
        ctx.logvar_meta = (logvar.shape, logvar.dtype) if logvar is not None else None

    @staticmethod
    def backward(ctx, grad_out, *_unit_grads):
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return (None, *_differentiable_grads(ctx, grad_out), None, None)
        unit_grads = ctx.unit_grads
        if unit_grads is None:
            raise RuntimeError("Trying to backward through a pyvae likelihood a second time: its gradient buffer was "
                               "used by the first backward. Specify retain_graph=True on the first backward.")
        # With retain_graph=True the unit gradients must survive for the next backward: scale copies.
        # (Under torch.compile the traced backward is functional, so copying changes nothing there.)
        keep = torch.compiler.is_compiling() or torch._C._autograd._get_current_graph_task_keep_graph()
        if keep:
            unit_grads = [g.clone() if g is not None else None for g in unit_grads]
        else:
            ctx.unit_grads = None  # frees the buffers once autograd has taken the gradients
        reduction, pred_shape = ctx.spec.reduction, ctx.saved_tensors[0].shape
        if unit_grads[0] is None and unit_grads[1] is None and unit_grads[2] is None:
            return None, None, None, None, None, None
        if reduction in _SCALAR_REDUCTIONS:  # one upstream value, often 1
            upstream = _upstream(grad_out).reshape(())
            if not isinstance(ctx.upstream_scale, float) or ctx.upstream_scale != 1.0:
                upstream = upstream * ctx.upstream_scale
            for g in unit_grads:
                if g is not None:
                    _scale_grad_(g, upstream, ctx.spec.backend)
        else:
            upstream = expand_reduced_grad(_upstream(grad_out), reduction, pred_shape, pred_shape[0])
            for g in unit_grads:
                if g is not None:
                    g.mul_(upstream)
        grad_pred, grad_target, grad_logvar = unit_grads
        if grad_logvar is not None:
            logvar_shape, logvar_dtype = ctx.logvar_meta
            grad_logvar = grad_logvar.sum_to_size(logvar_shape).to(logvar_dtype)
        return None, grad_pred, grad_target, grad_logvar, None, None


def _upstream(grad_out: torch.Tensor) -> torch.Tensor:
    """The upstream gradient in the precision of the gradients (float32, float64 for float64)."""
    return grad_out.to(torch.promote_types(grad_out.dtype, torch.float32))


def _differentiable_grads(ctx, grad_out) -> list:
    """The gradients of pred, target and logvar as differentiable functions of the inputs and of
    ``grad_out``: the forward op asked again (per element: no row groups) at a unit upstream, under
    grad mode, so that its registered derivative carries the next order."""
    pred, target, logvar = ctx.saved_tensors
    spec = ctx.spec
    wanted = [ctx.needs_input_grad[i] for i in (1, 2, 3)]
    flags = _op_flags("none", wanted)  # per element: the upstream gradient may differ per element
    _, grads = backends.differentiable_op(_OP, "likelihood_forward", spec.backend)(
        spec.loss, pred, target, logvar, spec.fixed_logvar, spec.constant, flags,
        _grad_scale(spec.reduction, pred.shape))
    upstream = _upstream(grad_out) if spec.reduction in _SCALAR_REDUCTIONS else \
        expand_reduced_grad(_upstream(grad_out), spec.reduction, pred.shape, pred.shape[0])
    remaining = iter(grads)
    result = [next(remaining) * upstream if want else None for want in wanted]
    if result[0] is not None:
        result[0] = result[0].to(pred.dtype)
    if result[1] is not None:
        result[1] = result[1].to(target.dtype)
    if result[2] is not None:
        result[2] = result[2].sum_to_size(logvar.shape).to(logvar.dtype)
    return result


# --------------------------------------------------------------------------- API
def _apply(spec: LikelihoodSpec, pred, target, logvar) -> torch.Tensor:
    """The loss of :class:`LikelihoodFunction`, asking its forward for the gradients autograd will
    need: those of the inputs that require one, when grad mode is on (``needs_input_grad`` would
    follow requires_grad even under torch.no_grad(), where no backward comes)."""
    needs = (pred.requires_grad, target.requires_grad, logvar is not None and logvar.requires_grad)
    return apply(LikelihoodFunction, spec, pred, target, logvar, torch.is_grad_enabled(), needs)[0]


def _prepare(pred_name: str, pred, target, reduction: str, backend: str):
    """Shared argument checks; returns the concrete backend."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        check_floating(pred_name, pred, "torch")
        check_floating("target", target, "torch")
    check_reduction(reduction)
    if pred.dim() == 0:
        raise ValueError(f"{pred_name} must have a batch dimension [B, ...], got a 0-d tensor")
    if pred.shape != target.shape:
        raise ValueError(f"{pred_name} and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    device = check_same_device(**{pred_name: pred, "target": target})
    resolved = backends.resolve(backend, device, _OP)
    check_floating(pred_name, pred, resolved)
    check_floating("target", target, resolved)
    return resolved


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "batchmean",
                  backend: str = "auto") -> torch.Tensor:
    """Negative log-likelihood of ``target`` under Bernoulli(sigmoid(logits)), per element
    ``softplus(l) - t * l`` (stable for any logit), in float32.

    ``logits`` and ``target`` are ``[B, ...]`` of the same shape on one device, float32, float16 or
    bfloat16 (each its own dtype; float64 on ``backend="torch"``). Soft targets in [0, 1] are fine;
    targets outside [0, 1] are not clamped: the same formula is evaluated (as
    ``F.binary_cross_entropy_with_logits`` does), which is then no log-likelihood and is unbounded
    below. ``reduction``: ``"batchmean"`` (default: sum / B, the ELBO's reconstruction term per
    sample), ``"per_sample"`` (``[B]``, the NLL of each observation), ``"sum"``, ``"mean"``
    (per element, as ``F.binary_cross_entropy_with_logits``'s default), ``"none"``.
    Gradients flow to ``logits`` and ``target`` (``sigmoid(l) - t`` and ``-l``). Non-finite inputs, on
    every backend: IEEE arithmetic (NaN in gives NaN), except that an infinite logit gives the limit
    ``l -> ±inf``, ``c l`` with ``c = 1 - t`` at +inf and ``-t`` at -inf, 0 where ``c = 0``. Values and
    gradients equal ``F.binary_cross_entropy_with_logits``'s but where its value is NaN at
    ``l = -inf`` (``t <= 1``) and at ``l = +inf`` (``t = 1``); the README lists the rules.
    """
    resolved = _prepare("logits", logits, target, reduction, backend)
    return _apply(LikelihoodSpec("bernoulli", reduction, resolved), logits, target, None)


def continuous_bernoulli_nll(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "batchmean",
                             backend: str = "auto") -> torch.Tensor:
    """Negative log-likelihood of ``target`` in [0, 1] under the normalised continuous Bernoulli
    (Loaiza-Ganem & Cunningham, 2019) with ``lambda = sigmoid(logits)``:
    ``softplus(l) - t * l - log C(l)``, ``C(l) = l / tanh(l / 2)`` (the normaliser; its Taylor series
    is used for ``|l| < 0.25``, so it is exact at ``lambda = 0.5`` and stable for saturated logits).

    Same arguments, dtypes, reductions and gradients as :func:`bernoulli_nll`; matches
    ``-torch.distributions.ContinuousBernoulli(logits=l).log_prob(t)`` (values and gradients) for
    ``|l| <= 20``, beyond which PyTorch's normaliser loses accuracy, and at ``l = ±inf`` where that is
    not NaN: an infinite logit gives the limit, +inf where ``c l = +inf`` (``c`` as in
    :func:`bernoulli_nll`), else -inf. Targets outside [0, 1] are evaluated by the same formula, not
    clamped.
    """
    resolved = _prepare("logits", logits, target, reduction, backend)
    return _apply(LikelihoodSpec("continuous_bernoulli", reduction, resolved), logits, target, None)


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor, logvar: Union[None, float, torch.Tensor, str] = None, *,
                 full: bool = True, reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Negative log-likelihood of ``target`` under N(mean, sigma^2), per element
    ``0.5 ((t - m)^2 / sigma^2 + log sigma^2 + log 2 pi)`` (the constant only when ``full``), float32.

    ``logvar`` (log sigma^2) is ``None`` (unit variance), a float (fixed), a tensor broadcastable to
    ``mean`` (per pixel, per channel, or one learned scalar; its gradient is summed over the
    broadcast dims), or ``"optimal"``: the one variance shared by the whole batch that maximises its
    likelihood, sigma^2 = mean squared error over the batch (sigma-VAE, Rybkin et al. 2021), with
    gradients flowing through it. ``reduction`` as in :func:`bernoulli_nll`.
    Values and gradients are the eager formula's under autograd (IEEE arithmetic), except where
    ``exp(-logvar)`` overflows (``logvar = -inf``, or below -88.7 in float32): the variance is 0, the
    loss +inf where ``target != mean`` and NaN where equal (the formula gives NaN at ``-inf``).
    """
    if isinstance(logvar, str):
        if logvar != "optimal":
            raise ValueError(f"logvar must be None, a float, a tensor or 'optimal', got {logvar!r}")
        return _gaussian_nll_optimal(mean, target, full, reduction, backend)
    if logvar is not None and not isinstance(logvar, (float, int, torch.Tensor)) or isinstance(logvar, bool):
        raise TypeError(f"logvar must be None, a float, a tensor or 'optimal', got {type(logvar).__name__}")
    resolved = _prepare("mean", mean, target, reduction, backend)
    constant = _HALF_LOG_2PI if full else 0.0
    if isinstance(logvar, torch.Tensor):
        check_floating("logvar", logvar, "torch")
        if logvar.device != mean.device:
            raise ValueError(f"logvar is on {logvar.device} but mean is on {mean.device}")
        try:
            torch.broadcast_shapes(logvar.shape, mean.shape)
            broadcasts = len(logvar.shape) <= mean.dim() and torch.broadcast_shapes(logvar.shape, mean.shape) == mean.shape
        except RuntimeError:
            broadcasts = False
        if not broadcasts:
            raise ValueError(f"logvar of shape {tuple(logvar.shape)} does not broadcast to mean's shape "
                             f"{tuple(mean.shape)}")
        return _apply(LikelihoodSpec("gaussian", reduction, resolved, constant=constant), mean, target, logvar)
    spec = LikelihoodSpec("gaussian", reduction, resolved, fixed_logvar=0.0 if logvar is None else float(logvar),
                          constant=constant)
    return _apply(spec, mean, target, None)


def _gaussian_nll_optimal(mean, target, full, reduction, backend):
    """sigma^2 = MSE over the batch, from the fused per-sample sums of squared errors; autograd
    carries the gradient through sigma^2 (for every reduction but "none" one pass each way)."""
    # per-sample 0.5 * sum (t - m)^2: the unit-variance Gaussian without its constant
    half_sse = gaussian_nll(mean, target, None, full=False, reduction="per_sample", backend=backend)
    per_sample_numel = mean[0].numel() if mean.shape[0] else 0
    variance = 2.0 * half_sse.sum() / mean.numel()
    log_var = torch.log(variance)
    constant = _HALF_LOG_2PI if full else 0.0
    if reduction == "none":
        return gaussian_nll(mean, target, log_var, full=full, reduction="none", backend=backend)
    per_sample = half_sse / variance + per_sample_numel * (0.5 * log_var + constant)
    return reduce_rows(per_sample, reduction, mean.numel()) if reduction != "per_sample" else per_sample


_FAMILY = backends.load_op_family(_OP, {"likelihood_forward": _torch_forward, "scale_grad_": _torch_scale_grad_},
                                  derivatives={"likelihood_forward": reference_derivative(_torch_forward, (1, 2, 3))})
