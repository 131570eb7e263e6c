"""Benchmark of pyvae's vector quantisation against what VQ-VAEs use today.

nearest_code providers::

    eager:          d = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)
                    idx = d.argmin(1); q = e[idx]            (the full N x K matrix in memory)
    cdist:          idx = torch.cdist(x, e).argmin(1); q = e[idx]
    torch.compile:  of the eager code (default and max-autotune-no-cudagraphs)

vector_quantize forward+backward against vector-quantize-pytorch's ``VectorQuantize`` with a learned
codebook (no EMA) and commitment weight 0.25, the same losses as pyvae's (installed only for the
benchmark; the rows are skipped where it is missing). TFLOP/s counts 2 N K D; on a GPU the notes of
the ``fast`` rows give it as a share of the dense tensor-core peak (TF32 for float32 inputs, bf16
for bfloat16 ones) and how often ``fast`` departs from ``exact``.
"""
from __future__ import annotations

import torch

import pyvae
from harness import Case, Row, tensor_core_peak_tflops, time_case

OP = "vq"


def eager_nearest(x, e):
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(1)
    idx = d.argmin(1)
    return idx, e[idx]


def cdist_nearest(x, e):
    idx = torch.cdist(x, e).argmin(1)
    return idx, e[idx]


def shapes(device: str, full: bool) -> dict:
    """The issue's target shapes (the headline); then, with ``full``, shapes at the ends of the
    supported ranges (D = 3 and 1000, K = 1 and 65536), to show the search has no cliff there."""
    if device == "cpu":
        nearest = [(16384, 1024, 64, torch.float32)]
        if full:
            nearest += [(4096, k, d, torch.float32) for k, d in ((1024, 3), (1024, 1000), (1, 64), (65536, 64))]
        return {"nearest": nearest, "vq": [(16384, 1024, 64)]}
    n, k, d = 65536, 16384, 256
    nearest = [(n, k, d, torch.float32), (n, k, d, torch.bfloat16)]
    if full:
        nearest += [(65536, k, d, torch.float32) for k, d in ((1024, 3), (1024, 1000), (1, 256))]
        nearest += [(16384, 65536, 256, torch.float32)]
    return {"nearest": nearest, "vq": [(16384, 4096, 256)]}


def _vqp_step(n, k, d, device):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    vq = VectorQuantize(dim=d, codebook_size=k, commitment_weight=0.25, learnable_codebook=True,
                        ema_update=False).to(device)
    x = torch.randn(1, n, d, device=device, requires_grad=True)

    def step():
        q, _, loss = vq(x)
        (q.sum() + loss.sum()).backward()
        x.grad = None
        vq.zero_grad(set_to_none=True)

    return step


def _mismatch_note(x, e, backend: str) -> str:
    """How often precision="fast" picks another code than "exact", and how much farther it is."""
    with torch.no_grad():
        fast_idx, fast_dist = pyvae.nearest_code(x, e, precision="fast", backend=backend)
        exact_idx, exact_dist = pyvae.nearest_code(x, e, precision="exact", backend=backend)
        differ = fast_idx != exact_idx
        rate = differ.float().mean().item()
        excess = ((fast_dist - exact_dist)[differ] / exact_dist[differ].clamp_min(1e-30)).mean().item() if rate else 0.0
    return f"fast vs exact: {100 * rate:.3f}% of rows differ, mean relative excess distance {excess:.2e}"


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    rows: list[Row] = []
    backends_here = [b for b in pyvae.backends.available(device, "vq")
                     if b != "torch" and not (b == "triton" and device == "cpu")]
    for n, k, d, dtype in shapes(device, full)["nearest"]:
        x, e = torch.randn(n, d, device=device).to(dtype), torch.randn(k, d, device=device).to(dtype)
        steps = {"eager": lambda: eager_nearest(x, e), "torch.cdist": lambda: cdist_nearest(x, e),
                 "torch.compile": (lambda f: lambda: f(x, e))(torch.compile(eager_nearest)),
                 "torch.compile max-autotune": (lambda f: lambda: f(x, e))(
                     torch.compile(eager_nearest, mode="max-autotune-no-cudagraphs"))}
        for b in backends_here:
            for precision in (("exact",) if device == "cpu" else ("exact", "fast")):
                steps[f"pyvae {b} {precision}"] = (lambda b, p: lambda: pyvae.nearest_code(
                    x, e, precision=p, backend=b))(b, precision)
        traffic = x.element_size() * (n * d + k * d) + 12 * n
        case_rows = time_case(Case(f"{OP} nearest_code", f"N={n} K={k} D={d}", dtype, "forward", steps,
                                   traffic, n * d, flops=2 * n * k * d), device)
        peak = tensor_core_peak_tflops(device, dtype)
        for row in case_rows:
            if row.provider.endswith(" fast"):
                row.note = _mismatch_note(x, e, row.provider.split()[1])
                if peak and row.tflops:
                    row.note += f"; {100 * row.tflops / peak:.0f}% of the {peak:g} TFLOP/s dense tensor-core peak"
        rows += case_rows
        if progress is not None:
            progress.update(1)
    for n, k, d in shapes(device, full)["vq"]:
        x = torch.randn(n, d, device=device, requires_grad=True)
        e = torch.randn(k, d, device=device, requires_grad=True)

        def pyvae_step(b):
            def step():
                r = pyvae.vector_quantize(x, e, backend=b)
                (r.quantized.sum() + r.loss).backward()
                x.grad = e.grad = None
            return step

        def eager_step():
            idx, q = eager_nearest(x.detach(), e)
            quantized = x + (q - x).detach()
            loss = ((x.detach() - q) ** 2).mean() + 0.25 * ((x - q.detach()) ** 2).mean()
            (quantized.sum() + loss).backward()
            x.grad = e.grad = None

        steps = {"eager": eager_step}
        vqp = _vqp_step(n, k, d, device)
        if vqp is not None:
            steps["vector-quantize-pytorch"] = vqp
        for b in backends_here:
            steps[f"pyvae {b}"] = pyvae_step(b)
        traffic = 4 * (3 * n * d + 2 * k * d)
        rows += time_case(Case(f"{OP} vector_quantize", f"N={n} K={k} D={d}", torch.float32, "forward+backward",
                               steps, traffic, n * d, flops=2 * n * k * d), device)
        if progress is not None:
            progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    s = shapes(device, full)
    return len(s["nearest"]) + len(s["vq"])
