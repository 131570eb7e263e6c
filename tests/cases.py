"""Shared test cases: the (device, backend) pairs and dtypes every op family is tested on, input
makers for the layouts the API promises to read (contiguous, strided, expanded, transposed), value
pools with the special values (±inf, NaN, huge, tiny), and a closeness check whose tolerance is set
per element by the magnitude of the terms that were added (not by the result, which may cancel)."""
from __future__ import annotations

import math

import torch

from conftest import device_backends
from tolerances import VALUE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "per_sample", "sum", "batchmean", "mean"]
PAIRS = device_backends()
NATIVE_PAIRS = [(d, b) for d, b in PAIRS if b != "torch"]
LAYOUTS = ("contiguous", "row_padded", "strided", "expanded", "transposed")


def pair_id(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


def interpreted(pair) -> bool:
    """Triton in its CPU interpreter: slow, so cases there stay few and small."""
    return pair[1] == "triton" and pair[0] == "cpu"


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


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, table=VALUE,
                        scale: torch.Tensor | float = 1.0, what: str = "") -> None:
    """``actual`` against the float64 ``expected`` rounded to ``actual``'s dtype (an output that
    overflows its dtype is inf, as the kernels' is): NaN exactly where expected is NaN, ±inf exactly
    where expected is ±inf, elsewhere ``|actual - expected| <= atol + rtol * scale`` elementwise, with
    (atol, rtol) = ``table[dtype]`` and ``scale`` the magnitude the result was summed from (at least
    ``|expected|``)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().to(actual.dtype).double().cpu()
    atol, rtol = table[dtype]
    scale = torch.as_tensor(scale, dtype=torch.float64).cpu()
    scale = torch.maximum(torch.nan_to_num(scale, nan=0.0, posinf=math.inf), e.abs().nan_to_num(0.0, 0.0, 0.0))
    nan_mismatch = a.isnan() != e.isnan()
    inf_mismatch = (a.isinf() | e.isinf()) & ~(e.isnan() | a.isnan()) & (a != e)
    finite = a.isfinite() & e.isfinite()
    err = (a - e).abs()
    too_far = finite & (err > atol + rtol * scale)
    bad = nan_mismatch | inf_mismatch | too_far
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        first = tuple(where[0]) if where else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (first at {where}: actual "
            f"{a[first].item() if a.dim() else a.item()!r}, expected {e[first].item() if e.dim() else e.item()!r}, "
            f"scale {scale.expand(e.shape)[first].item() if e.dim() else scale.item()!r}; "
            f"nan mismatches {int(nan_mismatch.sum())}, inf mismatches {int(inf_mismatch.sum())})")


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
