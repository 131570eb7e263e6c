"""Argument checks and reductions shared by every op family (one meaning on every op)."""
from __future__ import annotations

import functools

import torch

REDUCTIONS = ("none", "per_sample", "sum", "batchmean", "mean")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")


def check_floating(name: str, t: object, backend: str) -> None:
    """TypeError unless ``t`` is a floating tensor this backend computes in."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {t.dtype}")
    if backend != "torch" and t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}, which the {backend!r} backend does not serve "
                        f"(float32, float16, bfloat16); use backend='torch' for float64")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: all inputs must share one device")
    return first


def reduce_rows(per_row: torch.Tensor, reduction: str, numel: int) -> torch.Tensor:
    """Per-sample sums [...] -> the requested reduction ('none' is handled by the caller)."""
    if reduction == "per_sample":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per_row.numel()
    return total / numel  # mean


def expand_reduced_grad(grad: torch.Tensor, reduction: str, shape: torch.Size, samples: int) -> torch.Tensor:
    """The gradient of a reduced loss as a per-element (possibly expanded, stride-0) tensor.

    ``per_sample`` gradients have the leading dims of ``shape`` (one value per sample, the sum
    running over the rest); ``batchmean`` divided by ``samples``, ``mean`` by the element count.
    """
    if reduction == "none":
        return grad
    if reduction == "per_sample":
        return grad.reshape(*grad.shape, *([1] * (len(shape) - grad.dim()))).expand(shape)
    if reduction == "batchmean":
        grad = grad / samples
    elif reduction == "mean":
        grad = grad / shape.numel()
    return grad.expand(shape)


# --------------------------------------------------------------------------- derivatives of the ops
def reference_vjp(reference, args: tuple, differentiable: tuple[int, ...], grad_outputs) -> list:
    """The vector-Jacobian product of an op computed through its PyTorch reference (same signature
    as the op): ``reference(*args)``'s outputs (tensors, or lists of tensors), paired with
    ``grad_outputs`` (same structure; None where no gradient came), differentiated against the
    floating tensor arguments at positions ``differentiable``. Returns one entry per argument (None
    where none). Taken with ``torch.func.vjp``, so the result is differentiable again under grad
    mode (a backward with ``create_graph=True``) and inside ``torch.func`` transforms: this is how
    the fused ops get exact higher-order derivatives without a kernel for each order."""
    positions = [i for i in differentiable
                 if i < len(args) and isinstance(args[i], torch.Tensor) and args[i].dtype.is_floating_point]
    result: list = [None] * len(args)
    cotangents = []

    def outputs_with_gradients(*values):
        merged = list(args)
        for i, v in zip(positions, values):
            merged[i] = v
        pairs = [(out, grad) for out, grad in _pair(reference(*merged), grad_outputs)
                 if grad is not None and out is not None and out.dtype.is_floating_point]
        cotangents[:] = [grad.to(out.dtype) for out, grad in pairs]
        return tuple(out for out, _ in pairs)

    if not positions:
        return result
    _, vjp_fn = torch.func.vjp(outputs_with_gradients, *(args[i] for i in positions))
    if not cotangents:
        return result
    for i, g in zip(positions, vjp_fn(tuple(cotangents))):
        result[i] = g
    return result


def _pair(outputs, grads) -> list:
    """(output, its gradient) for each tensor an op returned; a list output (``Tensor[]``) is paired
    element by element (its gradient may be None as a whole)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = grads if isinstance(grads, (tuple, list)) else (grads,)
    pairs = []
    for out, grad in zip(outputs, grads):
        if isinstance(out, (list, tuple)):
            pairs.extend(zip(out, grad if grad is not None else [None] * len(out)))
        else:
            pairs.append((out, grad))
    return pairs


def save_args(ctx, args: tuple) -> None:
    """Keeps an op's arguments for its backward: tensors through ``save_for_backward`` (so autograd
    checks they were not modified in place), everything else as is; :func:`saved_args` gives them back."""
    ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in args))
    ctx.other_args = tuple(None if isinstance(a, torch.Tensor) else a for a in args)


def saved_args(ctx) -> tuple:
    return tuple(t if t is not None else other for t, other in zip(ctx.saved_tensors, ctx.other_args))


def reference_derivative(reference, differentiable: tuple[int, ...]):
    """The derivative of an op taken through its PyTorch reference (:func:`reference_vjp`), as
    ``(setup_context, make_backward)`` for :func:`pyvae.backends.load_op_family`. For the ops whose
    inputs autograd does not otherwise differentiate (backward ops, the likelihood's gradient
    outputs): it is what makes second- and higher-order gradients of the fused ops exact."""
    def setup_context(ctx, inputs, output):
        save_args(ctx, inputs)

    def make_backward(backend: str):
        def backward(ctx, *grads):
            return tuple(reference_vjp(reference, saved_args(ctx), differentiable, grads))
        return backward

    return setup_context, make_backward


# --------------------------------------------------------------------------- applying the Functions
def apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` for a Function written with ``setup_context`` (which the
    ``torch.func`` transforms need), through an equivalent Function with the context in its forward
    where no transform runs: torch binds a ``setup_context`` Function's default arguments with
    ``inspect.signature`` on every call, a cost of the order of a small op's whole kernel."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _context_in_forward(function).apply(*args)


@functools.lru_cache(maxsize=None)
def _context_in_forward(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same forward, setup_context and backward as ``function``, with the context in forward."""
    class ContextInForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = function.forward(*args)
            function.setup_context(ctx, args, output)
            return output

        backward = staticmethod(function.backward)

    ContextInForward.__name__ = ContextInForward.__qualname__ = function.__name__
    return ContextInForward
