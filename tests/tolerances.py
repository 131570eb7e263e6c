"""The one table of test tolerances, (atol, rtol) per input dtype against a float64 reference, and
the checks that apply them."""
from __future__ import annotations

import math

import torch

# Values in the input dtype (z, gradients): dominated by the dtype's rounding of the output.
VALUE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (5e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}

# float32 sums (KL per sample and its reductions): fp32 accumulation error grows with the row length.
SUM = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-4, 2e-5),
    torch.bfloat16: (1e-4, 2e-5),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, table=VALUE, scale: float = 1.0):
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, equal_nan=True)


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


def noise_scale(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The scale of a reparameterized sample ``z = mu + exp(logvar / 2) * eps`` for
    :func:`assert_close_scaled`: ``|mu| + std * (|eps| + 1)`` in float64 on the CPU (``eps`` may
    carry a leading samples dimension). Not ``|z|``, which cancels to ~0 where ``mu ~ -std * eps``:
    z's rounding scales with its terms, and eps's own error (a few ulps of 1, from log/sin/cos)
    with std."""
    std = torch.exp(0.5 * logvar.detach().double().cpu())
    return mu.detach().double().cpu().abs() + std * (eps.detach().double().cpu().abs() + 1)


def assert_nearest_codes(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> None:
    """VQ's exact criterion: each row's chosen code is, in float64, within 1e-5 (|x|^2 + |e|^2) of
    the row's nearest (a search in float32 may pick either of two codes closer than its rounding)."""
    x64 = x.detach().reshape(-1, codebook.shape[1]).double().cpu()
    e64 = codebook.detach().double().cpu()
    idx = idx.reshape(-1).cpu()
    d = torch.cdist(x64, e64) ** 2
    chosen = d.gather(1, idx.reshape(-1, 1)).squeeze(1)
    slack = 1e-5 * ((x64 ** 2).sum(1) + (e64[idx] ** 2).sum(1))
    assert (chosen - d.min(1).values <= slack + 1e-12).all()


def assert_states_close(theirs: torch.nn.Module, ours: torch.nn.Module, **tolerance) -> None:
    """A drop-in's state_dict against its peer's: the same keys in the same order, shapes and dtypes,
    and values within ``tolerance`` (torch.testing.assert_close's rtol / atol)."""
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(b[key], a[key], msg=key, **tolerance)
