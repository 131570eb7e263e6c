"""Argument checks and reductions shared by every op family (one meaning on every op)."""
from __future__ import annotations

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
