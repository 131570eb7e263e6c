"""Benchmark of pyvae's finite scalar quantization against the FSQ code people use today.

Providers: vector-quantize-pytorch's ``FSQ(levels)`` module (dim = len(levels): no projection; z as
one [1, N, d] batch), its formula as plain PyTorch ops (``eager``: the bound, the straight-through
round and ``codes_to_indices``, as the module computes them), that formula under torch.compile
(default and max-autotune-no-cudagraphs), and pyvae's fused backends. Every provider returns codes
and indices; forward+backward back-propagates one fixed dense upstream gradient into the codes (what
a decoder gives them).

The floor: FSQ is elementwise, one tanh (or a few compares) per value, so it is bound by memory
traffic and per-call overhead. Minimal logical traffic, in bytes, for N rows of d values of s bytes:
forward reads z and writes the codes and the int32 indices, ``2 N d s + 4 N``; backward reads z and
the upstream gradient and writes z's gradient, ``3 N d s``. At N = 65536 in float32 that is 2.4 MB
forward and 5.5 MB forward+backward for levels 8,5,5,5 (d = 4), 2.9 MB and 6.8 MB for 8,8,8,6,5
(d = 5). With the caches cold (as here: the providers run in turn), this machine copies about
28 GB/s (a 1 MiB clone in 75 us), so about 0.09 ms forward and 0.2 ms forward+backward (d = 4);
from cache the copy rate of the same run (the % copy column) puts it at a few hundredths of a ms.
The arithmetic (an exponential and a reciprocal per value in backward, at about 0.4 ns a value and
core here) adds about 0.05 ms on two cores, and a call through the autograd Function about 0.06 ms.
Eager PyTorch instead makes some fifteen passes over [N, d] tensors (the bound's broadcasts, the
round, the detach trick, the division, the index's multiply-sum-round), and its autograd keeps
several of them for backward.
"""
from __future__ import annotations

import torch

import pyvae
from harness import Case, Row, time_case

OP = "fsq"
ROWS = 65536
EPS = 1e-3  # the module's bound margin


def eager_fsq(z: torch.Tensor, levels: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vector-quantize-pytorch 1.32's ``FSQ.bound`` with its straight-through round, and
    ``codes_to_indices``, as plain PyTorch (``levels``, ``basis``: int32 [d]); float32 arithmetic,
    codes in z's dtype, as the module casts them back."""
    zf = z.float()
    half_l = (levels - 1) * (1 + EPS) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    bounded = torch.tanh(zf + shift) * half_l - offset
    quantized = bounded + (bounded.round() - bounded).detach()
    half_width = levels // 2
    codes = quantized / half_width
    indices = ((codes * half_width + half_width) * basis).sum(dim=-1).round().to(torch.int32)
    return codes.to(z.dtype), indices


def eager_provider(levels: tuple[int, ...], device: str):
    levels_t = torch.tensor(levels, dtype=torch.int32, device=device)
    basis = torch.cumprod(torch.tensor([1, *levels[:-1]], device=device), dim=0, dtype=torch.int32)
    return lambda z: eager_fsq(z, levels_t, basis)


def module_provider(levels: tuple[int, ...], device: str):
    """vector-quantize-pytorch's FSQ module, or None where it is not installed."""
    try:
        from vector_quantize_pytorch import FSQ
    except ImportError:
        return None
    module = FSQ(list(levels), dim=len(levels)).to(device)
    return lambda z: module(z.unsqueeze(0))


def pyvae_provider(levels: tuple[int, ...], backend: str):
    return lambda z: pyvae.finite_scalar_quantize(z, levels, backend=backend)


def level_sets(full: bool) -> list[tuple[int, ...]]:
    """The FSQ paper's 2^10-entry codebook of levels 8,5,5,5 (the headline) and its 2^16-entry one."""
    return [(8, 5, 5, 5)] + ([(8, 8, 8, 6, 5)] if full else [])


def dtypes(full: bool) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if full else [torch.float32]


def providers(device: str, levels: tuple[int, ...]) -> dict:
    eager = eager_provider(levels, device)
    found = {"eager": eager, "torch.compile": torch.compile(eager),
             "torch.compile max-autotune": torch.compile(eager, mode="max-autotune-no-cudagraphs")}
    module = module_provider(levels, device)
    if module is not None:
        found["vector-quantize-pytorch"] = module
    for backend in pyvae.backends.available(device, OP):
        if backend == "torch" or (backend == "triton" and device == "cpu"):
            continue
        found[f"pyvae {backend}"] = pyvae_provider(levels, backend)
    return found


def _step(fn, z, upstream, mode):
    def forward():
        return fn(z)

    def forward_backward():
        codes, _ = fn(z)
        codes.backward(upstream.view_as(codes))
        z.grad = None

    return forward if mode == "forward" else forward_backward


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    for levels in level_sets(full):
        provs = providers(device, levels)
        d = len(levels)
        label = f"N={ROWS} levels={','.join(map(str, levels))}"
        for dtype in dtypes(full):
            for mode in ("forward", "forward+backward"):
                z = (1.5 * torch.randn(ROWS, d, generator=gen)).to(device=device, dtype=dtype)
                z.requires_grad_(mode != "forward")
                upstream = torch.randn(ROWS, d, generator=gen).to(device=device, dtype=dtype)
                elem = torch.finfo(dtype).bits // 8
                traffic = 2 * elem * z.numel() + 4 * ROWS + (3 * elem * z.numel() if mode != "forward" else 0)
                steps = {name: _step(fn, z, upstream, mode) for name, fn in provs.items()}
                rows += time_case(Case(OP, label, dtype, mode, steps, traffic, z.numel()), device)
                if progress is not None:
                    progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    return len(level_sets(full)) * len(dtypes(full)) * 2
