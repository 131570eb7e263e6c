"""Benchmark of pyvae's discretized mixture of logistics against the loss code people use today.

The eager baseline mirrors VDVAE's / PixelCNN++'s ``discretized_mix_logistic_loss`` (channels-last
parameters, RGB with the channel coupling, or one channel as WaveNet-style vocoders use it), summed
over positions and divided by B like pyvae's default reduction; it is also compiled with
torch.compile (default and max-autotune-no-cudagraphs modes). Its first and last classes are
decided by ``x < -1 + 1/(K-1)`` and ``x > 1 - 1/(K-1)``: PixelCNN++'s ``±0.999`` for 8-bit data, and
right for 16-bit data too.

Minimal logical traffic, in bytes: forward reads params (s per element, s their dtype's size) and x
(4 bytes per value, float32 on the data grid); forward+backward also writes params' gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import pyvae
from harness import Case, Row, time_case

OP = "dmol"
NUM_MIX = 10


def eager_dmol(params: torch.Tensor, x: torch.Tensor, num_mix: int, num_classes: int = 256) -> torch.Tensor:
    """Per-position NLL [B, *positions] of channels-last ``params`` [B, *positions, P] and ``x``
    [B, *positions, C] (floats on the data grid), as VDVAE / PixelCNN++ write it."""
    xs = x.shape
    channels = xs[-1]
    logit_probs = params[..., :num_mix]
    rest = params[..., num_mix:].reshape(*xs, -1)  # [..., C, 3M] (2M for one channel)
    means = rest[..., :num_mix]
    log_scales = torch.clamp(rest[..., num_mix:2 * num_mix], min=-7.0)
    x = x.unsqueeze(-1).expand(*xs, num_mix)
    if channels == 3:
        coeffs = torch.tanh(rest[..., 2 * num_mix:3 * num_mix])
        m2 = (means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]).unsqueeze(-2)
        m3 = (means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]).unsqueeze(-2)
        means = torch.cat([means[..., 0:1, :], m2, m3], dim=-2)
    half_bin = 1.0 / (num_classes - 1)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + half_bin)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - half_bin)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(
        x < -1.0 + half_bin, log_cdf_plus,
        torch.where(x > 1.0 - half_bin, log_one_minus_cdf_min,
                    torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                                log_pdf_mid - math.log((num_classes - 1) / 2))))
    log_probs = log_probs.sum(dim=-2) + F.log_softmax(logit_probs, dim=-1)
    return -torch.logsumexp(log_probs, dim=-1)


def eager_loss(num_classes: int):
    def loss(params, x):
        return eager_dmol(params.float(), x, NUM_MIX, num_classes).sum() / params.shape[0]
    return loss


def pyvae_loss(num_classes: int, backend: str):
    def loss(params, x):
        return pyvae.discretized_mix_logistic_nll(params, x, num_mix=NUM_MIX, num_classes=num_classes,
                                                  layout="channels_last", backend=backend, validate=False)
    return loss


def shapes(device: str, full: bool) -> list[tuple[tuple[int, ...], int]]:
    """(x's shape channels-first [B, C, *positions], classes): the headline case and, with ``full``,
    the FFHQ-256 and vocoder ones."""
    headline = [((16, 3, 64, 64), 256)]
    return headline + ([((4, 3, 256, 256), 256), ((8, 1, 16000), 65536)] if full else [])


def dtypes(full: bool) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if full else [torch.float32]


def providers(device: str, num_classes: int) -> dict:
    eager = eager_loss(num_classes)
    found = {"eager": eager, "torch.compile": torch.compile(eager),
             "torch.compile max-autotune": torch.compile(eager, mode="max-autotune-no-cudagraphs")}
    for backend in pyvae.backends.available(device, OP):
        if backend == "torch" or (backend == "triton" and device == "cpu"):
            continue
        found[f"pyvae {backend}"] = pyvae_loss(num_classes, backend)
    return found


def _step(fn, params, x, mode):
    def forward():
        return fn(params, x)

    def forward_backward():
        fn(params, x).backward()
        params.grad = None

    return forward if mode == "forward" else forward_backward


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    for (batch, channels, *positions), num_classes in shapes(device, full):
        provs = providers(device, num_classes)
        num_params = NUM_MIX * (1 + 3 * channels) if channels == 3 else 3 * NUM_MIX
        label = f"{batch}x{channels}x{'x'.join(map(str, positions))} M={NUM_MIX} K={num_classes}"
        for dtype in dtypes(full):
            for mode in ("forward", "forward+backward"):
                params = torch.randn(batch, *positions, num_params, generator=gen).to(device=device, dtype=dtype)
                params.requires_grad_(mode != "forward")
                k = torch.randint(0, num_classes, (batch, *positions, channels), generator=gen)
                x = (k.float() * (2.0 / (num_classes - 1)) - 1.0).to(device)
                elem = torch.finfo(dtype).bits // 8
                traffic = (1 if mode == "forward" else 2) * elem * params.numel() + 4 * x.numel()
                steps = {name: _step(fn, params, x, mode) for name, fn in provs.items()}
                rows += time_case(Case(f"{OP}", label, dtype, mode, steps, traffic, params.numel()), device)
                if progress is not None:
                    progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    return len(shapes(device, full)) * len(dtypes(full)) * 2
