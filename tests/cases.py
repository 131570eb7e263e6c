"""Shared test cases: the devices, (device, backend) pairs, dtypes and reductions every op family
is tested on, random inputs drawn from an explicit generator (:func:`randn`, :func:`rand`, and
:func:`make_tensor` for the layouts the API promises to read: contiguous, strided, expanded,
transposed), value pools with the special values (±inf, NaN, huge, tiny), and the reductions of a
float64 reference. Tolerances and the checks that apply them are in tolerances.py."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import pyvae

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "per_sample", "sum", "batchmean", "mean"]
LAYOUTS = ("contiguous", "row_padded", "strided", "expanded", "transposed")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends() -> list[tuple[str, str]]:
    """Every (device, backend) pair that works on this machine."""
    return [(d, b) for d in devices() for b in pyvae.backends.available(d)]


PAIRS = device_backends()
NATIVE_PAIRS = [(d, b) for d, b in PAIRS if b != "torch"]


def needs_native_cpu(op: str | None = None):
    """Skips a test of pyvae's C++ CPU backend (for the op family ``op``) where it is not built."""
    return pytest.mark.skipif("cpu" not in pyvae.backends.available("cpu", op), reason="extension not built")



def compile_pairs(op: str) -> list:
    """The (device, backend) pairs a torch.compile test runs on: ``torch`` and ``cpu`` on CPU tensors
    (the Triton interpreter cannot run a compiled Triton op: "Cannot access data pointer of
    Tensor"), the GPU backends on a CUDA device (gpu-marked, run by bench/gpu_check.sh)."""
    cpu = [("cpu", b) for b in ("torch", "cpu") if b in pyvae.backends.available("cpu", op)]
    return cpu + [pytest.param(("cuda", b), marks=pytest.mark.gpu, id=f"cuda-{b}") for b in ("cuda", "triton")]


def pair_id(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


def no_sync_pairs(op: str) -> list:
    """The pairs of a no-host-sync test: cuda and triton on a CUDA device (gpu-marked) and this
    machine's preferred CPU backend, on which the test's checks of what it measured run without the
    sync guard (probes.no_host_sync)."""
    cpu = ("cpu", pyvae.backends.available("cpu", op)[0])
    return [cpu] + [pytest.param(("cuda", b), marks=pytest.mark.gpu) for b in ("cuda", "triton")]


def skip_unless_available(pair, op: str) -> None:
    """Skips a case whose backend does not serve the op family ``op`` on its device here."""
    if pair[1] not in pyvae.backends.available(pair[0], op):
        pytest.skip(f"backend {pair[1]!r} does not serve {op} on {pair[0]} here")


def interpreted(pair) -> bool:
    """Triton in its CPU interpreter: slow, so cases there stay few and small."""
    return pair[1] == "triton" and pair[0] == "cpu"


def skip_if_interpreted(pair, numel: int, limit: int = 70_000) -> None:
    """Skips a case of more than ``limit`` elements under the Triton interpreter."""
    if interpreted(pair) and numel > limit:
        pytest.skip("too large for the Triton interpreter")


def run_with_cpu_isa(isa: str, script: str, cwd, *args: str) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python whose CPU kernels use at most the `isa` SIMD paths
    (PYVAE_CPU_ISA is read once per process, hence the subprocess)."""
    if "cpu" not in pyvae.backends.available("cpu"):
        pytest.skip("extension not built")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYVAE_CPU_ISA": isa})


def randn(*shape: int, gen: torch.Generator, device="cpu", dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """``scale * N(0, 1)`` drawn on the CPU from ``gen`` (float32, then rounded to ``dtype``), on ``device``."""
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


def rand(*shape: int, gen: torch.Generator, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) drawn on the CPU from ``gen``, on ``device`` in ``dtype``."""
    return torch.rand(shape, generator=gen).to(device=device, dtype=dtype)


def special_values(dtype: torch.dtype, huge: float | None = None, moderate: float = 100.0) -> list[float]:
    """0, ±1, ±moderate, ±huge (a quarter of the dtype's largest value unless given), ±tiny (the
    smallest normal number), ±inf and NaN, all representable in ``dtype``."""
    info = torch.finfo(dtype)
    huge = info.max / 4 if huge is None else min(huge, info.max / 4)
    return [0.0, 1.0, -1.0, moderate, -moderate, huge, -huge, info.tiny, -info.tiny,
            math.inf, -math.inf, math.nan]


def make_tensor(shape, dtype, layout: str, gen: torch.Generator, *, scale: float = 1.0, shift: float = 0.0,
                specials=(), fill_from=None, device="cpu") -> torch.Tensor:
    """A fresh random tensor of logical ``shape`` in ``dtype`` with the memory ``layout``:

    ``contiguous``; ``row_padded`` (rows of a wider tensor, unit last stride: a ``chunk`` of a linear
    output); ``strided`` (last-dim stride 2); ``expanded`` (the first dim a stride-0 view of one
    row); ``transposed`` (the last two dims swapped, so the last dim is not unit-stride; 1-D falls
    back to ``strided``). Values are ``shift + scale * N(0, 1)``; then each value of ``specials`` is
    written at a random position, or, with ``fill_from``, every element is drawn from that list.
    """
    shape = tuple(shape)
    if not shape:
        layout = "contiguous"
    if layout == "transposed" and len(shape) < 2:
        layout = "strided"

    def values(s):
        v = shift + scale * torch.randn(s, generator=gen, dtype=torch.float64)
        if fill_from is not None and math.prod(s):
            pool = torch.tensor(list(fill_from), dtype=torch.float64)
            v = pool[torch.randint(len(pool), s, generator=gen)]
        flat = v.reshape(-1)
        for value in specials:
            if flat.numel():
                flat[torch.randint(flat.numel(), (1,), generator=gen)] = value
        return flat.reshape(s).to(dtype)

    if layout == "contiguous":
        t = values(shape)
    elif layout == "row_padded":
        t = values((*shape[:-1], shape[-1] + 3))[..., :shape[-1]]
    elif layout == "strided":
        t = values((*shape[:-1], 2 * shape[-1]))[..., ::2]
    elif layout == "expanded":
        t = values((1, *shape[1:])).expand(shape)
    elif layout == "transposed":
        t = values((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert t.shape == shape
    return t.to(device)


def reduce_like(values: torch.Tensor, reduction: str, rows: int) -> torch.Tensor:
    """The five reductions of a float64 per-element tensor split into ``rows`` rows
    (``values.reshape(rows, -1)``): what an op's float32 reduction should give. Each stage is summed
    in float64 and rounded to float32, as a float32 per-sample sum or total is (inf where it
    overflows float32, even if the mean would not)."""
    if reduction == "none":
        return values
    per_sample = values.reshape(rows, -1).sum(1) if values.numel() else values.new_zeros(rows)
    per_sample = per_sample.float().double()
    if reduction == "per_sample":
        return per_sample
    total = per_sample.sum().float().double()
    if reduction == "sum":
        return total
    return total / (rows if reduction == "batchmean" else values.numel())
