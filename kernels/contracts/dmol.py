"""The contract of the discretized mixture of logistics ops (``csrc/dmol_ops.cpp``): see
:mod:`pyvae.kernels.contracts`. The numbers every backend shares are here too."""
from __future__ import annotations

from typing import Sequence

import torch

from . import KERNEL_DTYPES, check_dtype, sizes

MAX_CLASSES = 65536  # 16-bit data
LOG_SCALE_MIN = -7.0  # log-scales are clamped below here
MID_MASS_MIN = 1e-5  # a bin's mass below this: the mid-bin density instead
LOG_MID_MASS_MIN = -11.512925464970229  # log(MID_MASS_MIN)
UNIFORM_MIN = 1e-5  # the sampler's uniforms lie in [UNIFORM_MIN, 1 - UNIFORM_MIN] (PixelCNN++)


def num_params(num_mix: int, channels: int) -> int:
    """Parameters per position: 3M for one channel (logits, means, log-scales), M (1 + 3C) for
    three (logits, then per channel means, log-scales, coefficients)."""
    return 3 * num_mix if channels == 1 else num_mix * (1 + 3 * channels)


def check_dmol_forward(params: torch.Tensor, x: torch.Tensor, num_mix: int, num_classes: int, channels_last: bool,
                       per_position: bool, want_grad: bool, grad_scale: float, *,
                       dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    if num_mix < 1:
        raise ValueError(f"num_mix must be >= 1, got {num_mix}")
    if num_classes < 2 or num_classes > MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
    if x.dim() < 2 or params.dim() != x.dim():
        raise ValueError(f"params and x must have the same number of dims, at least 2, got {sizes(params)} and "
                         f"{sizes(x)}")
    ch = x.dim() - 1 if channels_last else 1
    channels = x.shape[ch]
    if channels != 1 and channels != 3:
        raise ValueError(f"x must have 1 or 3 channels (dim {ch}), got shape {sizes(x)}")
    if params.shape[ch] != num_params(num_mix, channels) or \
            any(params.shape[d] != x.shape[d] for d in range(x.dim()) if d != ch):
        raise ValueError(f"params must have x's shape with {num_params(num_mix, channels)} parameters in dim {ch}, "
                         f"got {sizes(params)} for x {sizes(x)}")
    check_dtype(params, "params", dtypes)
    check_dtype(x, "x", dtypes)
    if params.device != x.device:
        raise ValueError("params and x must be on the same device")


def new_dmol_forward_outputs(params: torch.Tensor, x: torch.Tensor, num_mix: int, num_classes: int,
                             channels_last: bool, per_position: bool, want_grad: bool, grad_scale: float
                             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The NLL (float32: per position [B, *positions] with ``per_position``, else per sample [B])
    and, with ``want_grad``, its gradient to params (contiguous, params' dtype)."""
    ch = x.dim() - 1 if channels_last else 1
    positions = [s for d, s in enumerate(x.shape) if d != ch]
    out = params.new_empty(positions if per_position else positions[:1], dtype=torch.float32)
    return out, [torch.empty_like(params, memory_format=torch.contiguous_format)] if want_grad else []


def check_dmol_sample(params: torch.Tensor, seed: torch.Tensor, num_mix: int, channels: int, channels_last: bool,
                      temperature: float, *, dtypes: Sequence[torch.dtype] = KERNEL_DTYPES) -> None:
    if num_mix < 1:
        raise ValueError(f"num_mix must be >= 1, got {num_mix}")
    if channels != 1 and channels != 3:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if params.dim() < 2:
        raise ValueError(f"params must have at least 2 dims, got {sizes(params)}")
    ch = params.dim() - 1 if channels_last else 1
    if params.shape[ch] != num_params(num_mix, channels):
        raise ValueError(f"params must have {num_params(num_mix, channels)} parameters in dim {ch}, got "
                         f"{sizes(params)}")
    check_dtype(params, "params", dtypes)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed must be a one-element int64 tensor")
    if seed.device != params.device:
        raise ValueError(f"seed must be on the device of params ({params.device}), got {seed.device}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def new_dmol_sample_outputs(params: torch.Tensor, seed: torch.Tensor, num_mix: int, channels: int,
                            channels_last: bool, temperature: float) -> torch.Tensor:
    """The sample: float32, params' shape with ``channels`` where params has its parameters."""
    shape = list(params.shape)
    shape[params.dim() - 1 if channels_last else 1] = channels
    return params.new_empty(shape, dtype=torch.float32)

