"""The cases of residual vector quantisation (op family ``rvq``; see families/__init__.py), and the
check every backend's residual search must pass (:func:`check_residual_search`)."""
import math

import torch

import pyvae

from . import DTYPES, HUGE, TRIMMED_DTYPES, OnCPU, arg, draw_values, pick


def example(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return pyvae.residual_quantize(a, torch.stack([b, 0.5 * b]), backend=backend).loss


def float32_residuals(x: torch.Tensor, codebooks: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
    """r_0 .. r_Q of the contract (float32, as every kernel computes them: exact elementwise float32
    subtractions of the float32 codes, so one set of indices gives one set of residuals), on the CPU."""
    q_stages, d = codebooks.shape[0], codebooks.shape[2]
    r = x.detach().float().cpu().reshape(-1, d)
    e = codebooks.detach().float().cpu()
    flat = idx.cpu().reshape(-1, q_stages)
    out = [r]
    for q in range(q_stages):
        r = r - e[q][flat[:, q]]
        out.append(r)
    return out


def check_residual_search(x, codebooks, idx, dist, quantized, slack_scale: float = 1e-5) -> None:
    """The residual search's outputs against the contract, given its own indices: each stage's code
    is the nearest to that stage's residual within float32 rounding (``slack_scale * (|r|^2 + |e|^2)``),
    ties to the lowest index, NaN rows at code 0 with NaN distances; dist is each new residual's
    squared norm; quantized is the float32 sum of the codes in stage order, rounded to x's dtype."""
    from tolerances import SUM, assert_close_scaled

    q_stages, k, d = codebooks.shape
    assert idx.dtype == torch.int64 and idx.shape == (*x.shape[:-1], q_stages), (idx.dtype, idx.shape)
    assert dist.dtype == torch.float32 and dist.shape == idx.shape
    assert quantized.dtype == x.dtype and quantized.shape == x.shape
    n = x.numel() // d if d else 0
    flat, dist = idx.cpu().reshape(n, q_stages), dist.cpu().reshape(n, q_stages)
    assert ((flat >= 0) & (flat < k)).all()
    e64 = codebooks.detach().double().cpu()
    residuals = float32_residuals(x, codebooks, idx)
    for q in range(q_stages):
        r64 = residuals[q].double()
        true = ((r64[:, None, :] - e64[q][None, :, :]) ** 2).sum(-1)  # [n, K], inf - finite stays inf
        nan_rows = r64.isnan().any(1)
        assert (flat[nan_rows, q] == 0).all() and dist[nan_rows, q].isnan().all(), f"stage {q}: NaN rows"
        for row in torch.nonzero(~nan_rows).flatten().tolist():
            valid = true[row].isfinite()
            c = int(flat[row, q])
            if not valid.any():
                assert c == 0, f"stage {q} row {row}: no finite distance, but code {c}"
                continue
            assert valid[c], f"stage {q} row {row}: code {c} at {true[row, c]} over a finite distance"
            slack = slack_scale * ((r64[row] ** 2).sum() + (e64[q][c] ** 2).sum()) + torch.finfo(torch.float32).tiny
            best = true[row][valid].min()
            assert true[row, c] <= best + slack, f"stage {q} row {row}: code {c} at {true[row, c]}, minimum {best}"
            assert not (e64[q][:c] == e64[q][c]).all(1).any(), f"stage {q} row {row}: code {c} has a lower twin"
        new = residuals[q + 1].double()
        finite = ~nan_rows
        assert_close_scaled(dist[finite, q], (new[finite] ** 2).sum(1), torch.float32, SUM,
                            (new[finite] ** 2).sum(1), f"stage {q} distances")
    e32 = codebooks.detach().float().cpu()
    total = torch.zeros(n, d)
    for q in range(q_stages):
        total = total + e32[q][flat[:, q]]
    torch.testing.assert_close(quantized.cpu().reshape(n, d), total.to(x.dtype), rtol=0, atol=0, equal_nan=True,
                               msg="quantized: the float32 sum of the chosen codes in stage order")


def sanitize(device: str, trim: bool) -> None:
    """Odd D and K, ragged tiles, one stage and several, every dtype, strided x, and the backward
    (codebook statistics of each stage)."""
    for n, q, k, d in pick([(1, 1, 1, 3), (70, 3, 5, 7), (129, 4, 65, 33), (300, 8, 1000, 64)],
                           [(1, 1, 1, 3), (129, 4, 65, 33)], trim):
        for dtype in pick(DTYPES, TRIMMED_DTYPES, trim):
            x = torch.randn(n, 2 * d, device=device).to(dtype)[:, ::2].requires_grad_()
            codebooks = (torch.randn(q, k, d, device=device) / torch.arange(1, q + 1, device=device)[:, None, None]
                         ).to(dtype).requires_grad_()
            for precision in ("exact", "fast"):
                r = pyvae.residual_quantize(x, codebooks, precision=precision, backend=device)
                (r.quantized.float().sum() + r.loss).backward()


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launcher called on meta tensors."""
    for dtype in DTYPES:
        for e_dtype in (dtype, torch.float32):
            for q, dim in ((1, 64), (4, 20), (8, 128), (2, 3), (4, 1000)):  # every BLOCK_D, and the scratch
                for exact in (True, False):
                    ops.residual_code(t(300, dim, dtype=dtype), t(q, 500, dim, dtype=e_dtype), exact)


# ------------------------------------------------------------------------------ bad calls
BAD_CALLS = [
    ("residual_code", lambda: (arg(4, 3), OnCPU(arg(2, 4, 3)), True), ValueError, "same device"),
    ("residual_code", lambda: (arg(5, 3), arg(2, 4, 4), True), ValueError,
     "x must be [..., D] with D = 4 (the codebooks'), got shape [5, 3]"),
    ("residual_code", lambda: (arg(5, 3), arg(4, 3), True), ValueError,
     "codebooks must be 3-D [Q, K, D], got shape [4, 3]"),
    ("residual_code", lambda: (arg(5, 3), arg(0, 4, 3), True), ValueError, "at least one stage (Q = 0)"),
    ("residual_code", lambda: (arg(5, 3), arg(2, 0, 3), True), ValueError, "at least one code (K = 0)"),
    ("residual_code", lambda: (arg(5, 3), arg(2, 4, 3, dtype=torch.float64), True), TypeError,
     "codebooks must be float32, float16 or bfloat16, got Double"),
    ("residual_code", lambda: (torch.zeros(5, 3, dtype=torch.int32), arg(2, 4, 3), True), TypeError,
     "x must be float32, float16 or bfloat16, got Int"),
]


# ------------------------------------------------------------------------------ property cases
PROPERTY_EXAMPLES = (40, 10)


def property_case(pair, draw):
    from cases import LAYOUTS, interpreted, make_tensor
    from tolerances import SUM, VALUE, assert_close_scaled

    device, backend = pair
    small = interpreted(pair)
    sizes = [1, 2, 3, 7] if small else [1, 3, 7, 65]  # 65: past a 64-wide tile
    d = draw.sample(sizes + ([33] if small else [130]), "D")
    k = draw.sample(sizes + ([65] if small else [130]), "K")
    q_stages = draw.sample([1, 2, 3] if small else [1, 2, 4, 8], "Q")
    lead = tuple(draw.sample_list([0, 1, 2, 5] if small else [0, 1, 3, 65], "leading dims", max_size=2))
    x_dtype = draw.sample(DTYPES, "x dtype")
    cb_dtype = draw.sample(DTYPES, "codebooks dtype")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    x = make_tensor((*lead, d), x_dtype, draw.sample(LAYOUTS, "x layout"), gen,
                    **draw_values(draw, x_dtype, "x", huge=HUGE), device=device)
    # later stages at smaller scales, as trained residual codebooks are
    codebooks = make_tensor((q_stages, k, d), cb_dtype, draw.sample(LAYOUTS, "codebooks layout"), gen,
                            **draw_values(draw, cb_dtype, "codebooks", huge=HUGE), device=device)
    if draw.boolean("one codebook shared by every stage"):
        codebooks = codebooks[:1].expand(q_stages, k, d)

    idx, dist, quantized = pyvae.backends.plain_op("rvq", "residual_code", backend)(x, codebooks, True)
    check_residual_search(x, codebooks, idx, dist, quantized)

    # residual_quantize: values, losses and gradients from the search's own indices
    xg = x.detach().requires_grad_()
    cg = codebooks.detach().requires_grad_()
    res = pyvae.residual_quantize(xg, cg, beta=0.25, backend=backend)
    assert torch.equal(res.indices, idx), "residual_quantize searched differently from residual_code"
    torch.testing.assert_close(res.quantized.detach(), quantized, rtol=0, atol=0, equal_nan=True)
    n = x.numel() // d
    flat = idx.cpu().reshape(n, q_stages)
    for q in range(q_stages):
        assert torch.equal(res.counts[q].cpu(), torch.bincount(flat[:, q], minlength=k)), f"stage {q} counts"
    residuals = [r.double() for r in float32_residuals(x, codebooks, idx)]
    if any(r.isnan().any() or r.isinf().any() for r in residuals):
        return  # the losses of rows without a finite distance are NaN / inf: the search's check covers them
    numel = max(x.numel(), 1)
    mse = torch.stack([(r ** 2).sum() for r in residuals[1:]]) / numel
    mse_scale = torch.stack([(r ** 2).sum() for r in residuals[1:]]) / numel * 2 + 1e-30
    assert_close_scaled(res.commitment_losses, mse, torch.float32, SUM, mse_scale, "commitment losses")
    assert_close_scaled(res.codebook_losses, mse, torch.float32, SUM, mse_scale, "codebook losses")
    weights = torch.arange(1, q_stages + 1, dtype=torch.float32, device=device)
    g = torch.randn(x.shape, generator=gen).to(device)
    ((res.quantized.float() * g).sum() + (res.codebook_losses * weights).sum()
     + (res.commitment_losses * 0.5 * weights).sum()).backward()
    scale = 2.0 / numel
    want_x = g.double().cpu().reshape(n, d) + sum((0.5 * (q + 1) * scale) * residuals[q + 1] for q in range(q_stages))
    abs_x = g.double().cpu().abs().reshape(n, d) + sum((0.5 * (q + 1) * scale) * residuals[q + 1].abs()
                                                      for q in range(q_stages))
    assert_close_scaled(xg.grad.reshape(n, d), want_x, x_dtype, VALUE, abs_x, "x gradient")
    e64 = codebooks.detach().double().cpu()
    for q in range(q_stages):
        counts = torch.bincount(flat[:, q], minlength=k).double()
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, flat[:, q], residuals[q])
        abs_sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, flat[:, q], residuals[q].abs())
        want = ((q + 1) * scale) * (counts[:, None] * e64[q] - sums)
        assert_close_scaled(cg.grad[q], want, cb_dtype, SUM,
                            ((q + 1) * scale) * (counts[:, None] * e64[q].abs() + abs_sums),
                            f"stage {q} codebook gradient")
    assert math.isfinite(float(res.loss.detach()))
