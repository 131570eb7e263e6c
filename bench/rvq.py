"""Benchmark of pyvae's residual vector quantisation (all stages in one fused call) against the
residual quantizers people use today.

Providers, each quantising x [N, D] through Q codebooks [K, D] (learned codebooks, commitment
weight 0.25, the straight-through gradient; forward+backward back-propagates the quantized vector's
sum plus the loss into x and the codebooks):

    vector-quantize-pytorch   its ``ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K,
                              learnable_codebook=True, ema_update=False, rotation_trick=False,
                              commitment_weight=0.25)`` (x as one [1, N, D] batch)
    eager chain               the residual loop in plain PyTorch: per stage the full [N, K]
                              distance matrix, argmin, gather, losses
    torch.compile chain       that loop under torch.compile
    pyvae chain               Q calls of ``pyvae.vector_quantize`` (one per stage, the residual
                              written to memory between them)
    pyvae <backend>           ``pyvae.residual_quantize``: one call, the residual never in memory

The floor: the search is 2 N K D flops per stage, ``2 N K D Q`` in all (17.2 GFLOP forward at
N=8192 D=128 Q=8 K=1024; 137 GFLOP at N=65536 D=64 Q=4 K=4096); on this machine's 2 AVX2 cores
(about 100 GFLOP/s of float32 FMA at best, 2 cores x 2 FMA units x 8 lanes x 2 flops x ~1.6 GHz
sustained) that is about 0.17 s and 1.4 s, so every provider is compute-bound in the search and the
fused op can only gain the chain's other passes (residual traffic, per-call overhead, the losses'
and gradients' extra passes). TFLOP/s counts the search's flops.
"""
from __future__ import annotations

import torch

import pyvae
from harness import Case, Row, time_case

OP = "rvq"
BETA = 0.25


def shapes(device: str, full: bool) -> list[tuple[int, int, int, int]]:
    """(N, D, Q, K): the issue's two shapes (an audio codec's 8 stages of 1024 codes; a tokenizer's
    4 stages of 4096), in the headline run too."""
    return [(8192, 128, 8, 1024), (65536, 64, 4, 4096)]


def eager_chain(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual loop as plain PyTorch: (quantized, loss)."""
    residual, quantized, loss = x, torch.zeros_like(x), x.new_zeros(())
    for e in codebooks.unbind(0):
        r = residual.detach()
        dist = r.pow(2).sum(1, keepdim=True) - 2 * r @ e.detach().t() + e.detach().pow(2).sum(1)
        q = e[dist.argmin(1)]
        loss = loss + ((r - q) ** 2).mean() + BETA * ((residual - q.detach()) ** 2).mean()
        stage = residual + (q - residual).detach()
        quantized = quantized + stage
        residual = residual - stage.detach()
    return quantized, loss


def pyvae_chain(backend: str):
    def chain(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual, quantized, loss = x, torch.zeros_like(x), x.new_zeros(())
        for e in codebooks.unbind(0):
            r = pyvae.vector_quantize(residual, e, beta=BETA, backend=backend)
            quantized = quantized + r.quantized
            residual = residual - r.quantized.detach()
            loss = loss + r.loss
        return quantized, loss
    return chain


def pyvae_fused(backend: str):
    def fused(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = pyvae.residual_quantize(x, codebooks, beta=BETA, backend=backend)
        return r.quantized, r.loss
    return fused


def vqp_provider(d: int, q: int, k: int, device: str, codebooks: torch.Tensor):
    """vector-quantize-pytorch's ResidualVQ with our codebooks, or None where it is not installed."""
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return None
    module = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, learnable_codebook=True, ema_update=False,
                        rotation_trick=False, commitment_weight=BETA).to(device)
    with torch.no_grad():
        for layer, e in zip(module.layers, codebooks.unbind(0)):
            layer._codebook.embed.copy_(e)

    def call(x: torch.Tensor, _codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, _, losses = module(x.unsqueeze(0))
        return quantized[0], losses.sum()
    call.module = module
    return call


def providers(device: str, d: int, q: int, k: int, codebooks: torch.Tensor) -> dict:
    found = {"eager chain": eager_chain, "torch.compile chain": torch.compile(eager_chain)}
    vqp = vqp_provider(d, q, k, device, codebooks)
    if vqp is not None:
        found["vector-quantize-pytorch"] = vqp
    for backend in pyvae.backends.available(device, OP):
        if backend == "torch" or (backend == "triton" and device == "cpu"):
            continue
        found[f"pyvae chain {backend}"] = pyvae_chain(backend)
        found[f"pyvae {backend}"] = pyvae_fused(backend)
    return found


def _step(fn, x, codebooks, mode):
    def forward():
        with torch.no_grad():
            return fn(x, codebooks)

    def forward_backward():
        quantized, loss = fn(x, codebooks)
        (quantized.sum() + loss).backward()
        x.grad = codebooks.grad = None
        module = getattr(fn, "module", None)
        if module is not None:
            module.zero_grad(set_to_none=True)

    return forward if mode == "forward" else forward_backward


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    for n, d, q, k in shapes(device, full):
        x = torch.randn(n, d, generator=gen).to(device)
        # later stages finer, as trained residual codebooks are
        scale = 0.5 ** torch.arange(q, dtype=torch.float32)[:, None, None]
        codebooks = (torch.randn(q, k, d, generator=gen) * scale).to(device)
        provs = providers(device, d, q, k, codebooks)
        for mode in ("forward", "forward+backward"):
            x.requires_grad_(mode != "forward")
            codebooks.requires_grad_(mode != "forward")
            steps = {name: _step(fn, x, codebooks, mode) for name, fn in provs.items()}
            # reads x and the codebooks, writes the quantized vector and the indices; backward reads
            # x, the codebooks and the gradient, writes both gradients
            traffic = 4 * (2 * n * d + q * k * d) + 8 * n * q
            if mode != "forward":
                traffic += 4 * (3 * n * d + 2 * q * k * d)
            # "eager chain" is the baseline of the speed-up column
            steps = {"eager" if name == "eager chain" else name: step for name, step in steps.items()}
            rows += time_case(Case(OP, f"N={n} D={d} Q={q} K={k}", torch.float32, mode, steps, traffic, n * d,
                                   flops=2 * n * k * d * q), device)
            if progress is not None:
                progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    return 2 * len(shapes(device, full))
