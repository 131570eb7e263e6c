"""The cases of vector quantisation (op family ``vq``; see families/__init__.py)."""
import math

import torch

import pyvae
from pyvae.ops.vq import codebook_stats_reference

from . import DTYPES, HUGE, TRIMMED_DTYPES, OnCPU, arg, draw_values, pick

# The VQ tests run on CPU tensors (their GPU cases are gpu-marked tests of their own).
VQ_BACKENDS = pyvae.backends.available("cpu", "vq")


def example(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return pyvae.vector_quantize(a, b, backend=backend).loss


def sanitize(device: str, trim: bool) -> None:
    """Odd D and K, ragged tiles, every dtype, strided x, skewed code usage."""
    for n, k, d in pick([(1, 1, 3), (70, 5, 7), (129, 65, 33), (300, 1000, 64)], [(1, 1, 3), (129, 65, 33)], trim):
        for dtype in pick(DTYPES, TRIMMED_DTYPES, trim):
            x = torch.randn(n, 2 * d, device=device).to(dtype)[:, ::2].requires_grad_()
            codebook = torch.randn(k, d, device=device).to(dtype).requires_grad_()
            for precision in ("exact", "fast"):
                r = pyvae.vector_quantize(x, codebook, precision=precision, backend=device)
                (r.quantized.float().sum() + r.loss).backward()
            skewed = torch.zeros(n, dtype=torch.int64, device=device)
            skewed[: n // 3] = torch.arange(n // 3, device=device) % k
            pyvae.codebook_stats(x.detach(), skewed, k, backend=device)


def triton_launches(ops, t) -> None:
    """Every Triton kernel variant of the family: its launchers called on meta tensors."""
    for dtype in DTYPES:
        for e_dtype in (dtype, torch.float32):
            for dim in (64, 37, 3, 1000):
                for exact in (True, False):
                    ops.nearest_code(t(300, dim, dtype=dtype), t(500, dim, dtype=e_dtype), exact)
        for dim in (64, 300):
            ops.codebook_stats(t(300, dim, dtype=dtype), t(300, dtype=torch.int64), 50)


# ------------------------------------------------------------------------------ bad calls
BAD_CALLS = [
    ("nearest_code", lambda: (arg(4, 3), OnCPU(arg(4, 3)), True), ValueError, "same device"),
    ("nearest_code", lambda: (arg(5, 3), arg(4, 4), True), ValueError, "x must be [..., D] with D = 4"),
    ("nearest_code", lambda: (arg(5, 3), arg(4, 3, 1), True), ValueError, "codebook must be 2-D"),
    ("nearest_code", lambda: (arg(5, 3), arg(0, 3), True), ValueError, "at least one code"),
    ("nearest_code", lambda: (arg(5, 3), arg(4, 3, dtype=torch.float64), True), TypeError, "codebook must be float32"),
    ("codebook_stats", lambda: (arg(5, 3), torch.zeros(6, dtype=torch.int64), 4), ValueError, "x's shape without"),
    ("codebook_stats", lambda: (arg(5, 3), torch.zeros(5, dtype=torch.int32), 4), TypeError, "indices must be int64"),
    ("codebook_stats", lambda: (arg(5, 3), torch.zeros(5, dtype=torch.int64), 0), ValueError, "num_codes must be"),

]


# ------------------------------------------------------------------------------ property cases
PROPERTY_EXAMPLES = (60, 15)


def _true_distances(x64, e64):
    """[N, K] float64 squared distances, written per element, so inf - finite is inf, not NaN."""
    return ((x64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)


def property_case(pair, draw):
    from cases import LAYOUTS, interpreted, make_tensor
    from tolerances import SUM, VALUE, assert_close_scaled

    device, backend = pair
    small = interpreted(pair)
    sizes = [1, 2, 3, 7] if small else [1, 3, 7, 65]  # 65: past a 64-wide tile
    d = draw.sample(sizes + ([33] if small else [130]), "D")
    k = draw.sample(sizes + ([65] if small else [130]), "K")
    lead = tuple(draw.sample_list([0, 1, 2, 5] if small else [0, 1, 3, 65], "leading dims", max_size=2))
    x_dtype = draw.sample(DTYPES, "x dtype")
    cb_dtype = draw.sample(DTYPES, "codebook dtype")
    gen = torch.Generator().manual_seed(draw.integers(0, 2**32 - 1, "data seed"))
    x = make_tensor((*lead, d), x_dtype, draw.sample(LAYOUTS, "x layout"), gen,
                    **draw_values(draw, x_dtype, "x", huge=HUGE), device=device)
    # an expanded codebook repeats one code K times: every row is a tie, which the lowest index wins
    codebook = make_tensor((k, d), cb_dtype, draw.sample(LAYOUTS, "codebook layout"), gen,
                           **draw_values(draw, cb_dtype, "codebook", huge=HUGE), device=device)
    n = x.numel() // d
    if n and draw.boolean("rows equal to codes"):
        x = x.clone()  # in x's layout (a transposed x has no [n, d] view)
        rows = torch.randint(n, (min(n, 3),), generator=gen)
        flat = x.reshape(n, d).clone()
        flat[rows] = codebook[torch.randint(k, (len(rows),), generator=gen)].to(x_dtype)
        x.copy_(flat.view(x.shape))

    idx, dist = pyvae.nearest_code(x, codebook, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == x.shape[:-1] and dist.dtype == torch.float32
    x64, e64 = x.double().cpu().reshape(n, d), codebook.double().cpu()
    flat, dist = idx.cpu().reshape(n), dist.cpu().reshape(n)
    assert ((flat >= 0) & (flat < k)).all()
    true = _true_distances(x64, e64)
    nan_rows = x64.isnan().any(1)
    # a row of x with NaN: index 0, distance NaN
    assert (flat[nan_rows] == 0).all() and dist[nan_rows].isnan().all(), "NaN rows"
    slack_x = (x64 ** 2).sum(1)
    for r in torch.nonzero(~nan_rows).flatten().tolist():
        valid = true[r].isfinite()
        if not valid.any():
            # every distance is inf (an infinite value in the row or in every code): code 0, at inf
            assert flat[r] == 0 and dist[r] == math.inf, f"row {r} with no finite distance: {flat[r]}, {dist[r]}"
            continue
        c = int(flat[r])
        assert valid[c], f"row {r}: chose code {c}, whose distance is {true[r, c]}, over a finite one"
        # + float32's smallest normal: squared distances below it are 0 in float32 arithmetic
        slack = 1e-5 * (slack_x[r] + (e64[c] ** 2).sum()) + torch.finfo(torch.float32).tiny
        best = true[r][valid].min()
        assert true[r, c] <= best + slack, f"row {r}: code {c} at {true[r, c]} but the minimum is {best}"
        # ties go to the lowest index: no lower code with the same values
        assert not (e64[:c] == e64[c]).all(1).any(), f"row {r}: code {c} has an identical lower-index twin"
        assert_close_scaled(dist[r:r + 1], true[r, c:c + 1], torch.float32, {torch.float32: (1e-6, 2e-5)},
                            slack / 2e-5 * 2, f"distance of row {r}")

    # codebook_stats on indices of the search, and on random ones
    for name, ids in (("search", idx), ("random", torch.randint(k, idx.shape, generator=gen).to(device))):
        counts, sums = pyvae.codebook_stats(x, ids, k, backend=backend)
        ref_counts, ref_sums = codebook_stats_reference(x.double().cpu(), ids.cpu(), k)
        assert counts.dtype == torch.float32 and torch.equal(counts.cpu().double(), ref_counts), f"{name} counts"
        _, abs_sums = codebook_stats_reference(x.double().cpu().abs(), ids.cpu(), k)
        atol_rows = ref_counts[:, None] * SUM[x_dtype][0] / SUM[x_dtype][1]  # atol per summed row
        assert_close_scaled(sums, ref_sums, x_dtype, SUM, abs_sums + atol_rows, f"{name} sums")

    # vector_quantize: straight-through values, losses and both gradients (the codebook's from the stats kernel)
    xg = x.detach().requires_grad_()
    cg = codebook.detach().requires_grad_()
    res = pyvae.vector_quantize(xg, cg, beta=0.25, backend=backend)
    assert torch.equal(res.indices, idx), "vector_quantize searched differently from nearest_code"
    torch.testing.assert_close(res.quantized.detach(), codebook[idx].to(x_dtype), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(res.counts.cpu(), torch.bincount(flat, minlength=k)), "counts"
    chosen = e64[flat]
    numel = max(x.numel(), 1)
    mse = ((x64 - chosen) ** 2).sum() / numel
    mse_scale = (x64 ** 2 + chosen ** 2).sum() / numel * 2
    assert_close_scaled(res.commitment_loss, mse, torch.float32, SUM, mse_scale, "commitment loss")
    assert_close_scaled(res.loss, 1.25 * mse, torch.float32, SUM, 1.25 * mse_scale, "loss")
    res.loss.backward()
    assert_close_scaled(xg.grad, (0.5 / numel) * (x64 - chosen).reshape(x.shape), x_dtype, VALUE,
                        (0.5 / numel) * (x64.abs() + chosen.abs()).reshape(x.shape), "x gradient")
    c_counts, c_sums = codebook_stats_reference(x.double().cpu(), idx.cpu(), k)
    _, c_abs = codebook_stats_reference(x.double().cpu().abs(), idx.cpu(), k)
    assert_close_scaled(cg.grad, (2.0 / numel) * (c_counts[:, None] * e64 - c_sums), cb_dtype, SUM,
                        (2.0 / numel) * (c_counts[:, None] * e64.abs() + c_abs), "codebook gradient")
