"""Property-based tests (hypothesis) of every op family on every backend this machine has: random
shapes (0, 1, odd, larger than every block), layouts (strided, expanded, transposed), dtypes and
values (±inf, NaN, huge, tiny), each against the float64 reference with the tolerances of
tests/tolerances.py and the README's NaN/Inf rules. Example counts are bounded and derandomized, so
CI runs the same cases every time; the Triton interpreter gets few, small ones."""
from __future__ import annotations

import math

import pytest
import torch

import pyvae
from pyvae.ops.likelihood import _cb_log_norm, likelihood_reference
from pyvae.ops.reparam_kl import reference_eps, reparameterize_kl_reference
from pyvae.ops.vq import codebook_stats_reference

from cases import (DTYPES, LAYOUTS, LOSSES, NATIVE_PAIRS, PAIRS, REDUCTIONS, interpreted, make_tensor, pair_id,
                   reduce_like, special_values)
from tolerances import SUM, VALUE, assert_close_scaled, noise_scale

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LN2 = math.log(2.0)
SCALES = [1e-3, 1.0, 30.0]  # of the normal values; 30 reaches exp overflow in logvar's tails
# "Huge" where values are multiplied or summed (likelihoods, VQ): their products and squares stay
# finite in float32, so a float32 sum's overflow does not depend on the order of its terms. The KL
# terms are never negative: there the huge values are a quarter of the dtype's largest.
HUGE = 1e15


def run_examples(pair, body, native: int, triton: int) -> None:
    """Runs ``body(pair, data)`` on ``native`` hypothesis examples (``triton`` under the interpreter)."""
    @settings(max_examples=triton if interpreted(pair) else native, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def examples(data):
        body(pair, data)

    examples()


def draw_values(data, dtype, label, *, huge=None, moderate=100.0, scale=None, shift=0.0):
    """Keyword arguments of make_tensor: normal values of a drawn scale, plus a few special values,
    or every element drawn from the special values (so that e.g. target == prediction happens)."""
    pool = special_values(dtype, huge, moderate)
    mode = data.draw(st.sampled_from(["normal", "specials", "pool"]), label=f"{label} values")
    kwargs = {"scale": scale if scale is not None else data.draw(st.sampled_from(SCALES), label=f"{label} scale"),
              "shift": shift}
    if mode == "specials":
        kwargs["specials"] = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4),
                                       label=f"{label} specials")
    elif mode == "pool":
        kwargs["fill_from"] = pool
    return kwargs


def worst(*dtypes):
    """The dtype with the loosest tolerance."""
    return max(dtypes, key=lambda d: VALUE[d][0])


# ----------------------------------------------------------------------------- reparameterize_kl
def _reparam_case(pair, data):
    device, backend = pair
    small = interpreted(pair)
    # rows beyond one program's BLOCK_R, rows longer than one 2048-element chunk of groups of 4
    z_dim = data.draw(st.sampled_from([1, 2, 3, 7, 33] + ([2049] if small else [8195])), label="Z")
    lead = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 5] if small or z_dim > 33 else [0, 1, 3, 70]), max_size=2),
                     label="leading dims")
    shape = (*lead, z_dim)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="data seed"))
    mu = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label="mu layout"), gen,
                     **draw_values(data, dtype, "mu"), device=device)
    logvar = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label="logvar layout"), gen,
                         **draw_values(data, dtype, "logvar"), device=device)
    prior_shapes = {"none": None, "full": shape, "per dim": (z_dim,), "per dim [1, Z]": (1, z_dim),
                    "per sample": (*lead, 1)}
    if len(shape) < 2:
        del prior_shapes["per dim [1, Z]"]  # a prior may not have more dims than mu
    prior_form = data.draw(st.sampled_from(list(prior_shapes)), label="prior")
    prior_mu = prior_logvar = None
    if prior_form != "none":
        which = data.draw(st.sampled_from(["both", "mu", "logvar"]), label="prior tensors")
        pshape = prior_shapes[prior_form]
        layout = data.draw(st.sampled_from(LAYOUTS), label="prior layout")
        if which != "logvar":
            prior_mu = make_tensor(pshape, dtype, layout, gen, **draw_values(data, dtype, "prior_mu"), device=device)
        if which != "mu":
            prior_logvar = make_tensor(pshape, dtype, layout, gen, **draw_values(data, dtype, "prior_logvar"),
                                       device=device)
    n_samples = data.draw(st.sampled_from([1, 2]), label="n_samples")
    reduction = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")

    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, n_samples=n_samples,
                                    seed=seed, reduction=reduction, backend=backend)

    mu64, lv64 = mu.double().cpu(), logvar.double().cpu()
    pmu64 = prior_mu.double().cpu() if prior_mu is not None else None
    plv64 = prior_logvar.double().cpu() if prior_logvar is not None else None
    z_ref, kl_el = reparameterize_kl_reference(mu64, lv64, torch.tensor(seed), n_samples, "none", pmu64, plv64)
    z_ref = z_ref[0] if n_samples == 1 else z_ref
    eps = reference_eps(seed, shape, n_samples, torch.float64)
    assert z.dtype == dtype
    assert_close_scaled(z, z_ref, dtype, VALUE, noise_scale(mu64, lv64, eps[0] if n_samples == 1 else eps), "z")

    if pmu64 is None and plv64 is None:
        kl_scale = 0.5 * (1 + lv64.abs() + mu64 ** 2 + torch.exp(lv64))
    else:
        zero = torch.zeros((), dtype=torch.float64)
        pmu, plv = (pmu64 if pmu64 is not None else zero), (plv64 if plv64 is not None else zero)
        x = lv64 - plv
        u = (mu64 - pmu) * torch.exp(-0.5 * (plv + LN2))
        kl_scale = u * u + torch.exp(x - LN2) + 0.5 * (x.abs() + 1)
    rows = mu.numel() // z_dim if z_dim else 0

    def reduce(values):
        out = reduce_like(values, reduction, rows)
        return out.reshape(shape[:-1]) if reduction == "per_sample" else out

    assert kl.dtype == torch.float32
    # each element is formed in float32 (inf where its float64 value overflows), then summed
    assert_close_scaled(kl, reduce(kl_el.float().double()), dtype, SUM, reduce(kl_scale), f"kl ({reduction})")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_reparameterize_kl_properties(pair):
    run_examples(pair, _reparam_case, native=80, triton=20)


# ----------------------------------------------------------------------------- likelihoods
# Not -100: for logvar in about (-176, -88.7) exp(-logvar) overflows float32 while the loss itself
# may not (test_gaussian_nll_tiny_variance below); the huge values (exp(-logvar) = inf or 0 in
# float64 too) and ±inf stay in the pool.
GAUSSIAN_LOGVAR_MODERATE = 50.0
LOGVAR_FORMS = ["none", "float", "scalar tensor", "per channel", "per channel, no batch dim", "per pixel",
                "per pixel, expanded", "per element", "per sample"]


def _logvar_shape(form, shape):
    ones = (1,) * (len(shape) - 2)
    return {"scalar tensor": (), "per channel": (1, shape[1], *ones) if len(shape) > 1 else (1,),
            "per channel, no batch dim": (shape[1], *ones) if len(shape) > 1 else (),
            "per pixel": (1, *shape[1:]), "per pixel, expanded": (1, *shape[1:]),
            "per element": shape, "per sample": (shape[0], *(1,) * (len(shape) - 1))}[form]


def _likelihood_case(pair, data):
    device, backend = pair
    small = interpreted(pair)
    loss = data.draw(st.sampled_from(list(LOSSES)), label="loss")
    big = data.draw(st.booleans(), label="past the 16384-column block")
    # 17: past a 16-row logvar group
    batch = data.draw(st.sampled_from(([1] if small else [1, 2, 3]) if big else [0, 1, 2, 3, 17]), label="B")
    if big:
        rest = data.draw(st.sampled_from([(16385,)] if small else [(16385,), (2, 8193), (32769,)]), label="rest")
    else:
        rest = tuple(data.draw(st.lists(st.sampled_from([1, 2, 3, 7]), min_size=0, max_size=3), label="rest"))
    shape = (batch, *rest)
    pred_dtype = data.draw(st.sampled_from(DTYPES), label="pred dtype")
    target_dtype = data.draw(st.sampled_from(DTYPES), label="target dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="data seed"))
    # logits of scale 0.3 sit around the continuous Bernoulli's switch to its Taylor series at |l| = 0.25
    pred_scale = data.draw(st.sampled_from([1.0, 0.3] if loss == "gaussian" else [3.0, 0.3]), label="pred scale")
    pred = make_tensor(shape, pred_dtype, data.draw(st.sampled_from(LAYOUTS), label="pred layout"), gen,
                       **draw_values(data, pred_dtype, "pred", huge=HUGE, scale=pred_scale), device=device)
    target = make_tensor(shape, target_dtype, data.draw(st.sampled_from(LAYOUTS), label="target layout"), gen,
                         **draw_values(data, target_dtype, "target", huge=HUGE, scale=0.25, shift=0.5), device=device)
    reduction = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    kwargs, logvar, fixed, constant = {}, None, 0.0, 0.0
    dtype = worst(pred_dtype, target_dtype)
    if loss == "gaussian":
        full = data.draw(st.booleans(), label="full")
        constant = 0.5 * math.log(2 * math.pi) if full else 0.0
        form = data.draw(st.sampled_from(LOGVAR_FORMS), label="logvar form")
        if form == "float":
            fixed = data.draw(st.sampled_from([-0.7, 0.0, 2.5]), label="fixed logvar")
            kwargs["logvar"] = fixed
        elif form != "none":
            lv_dtype = data.draw(st.sampled_from(DTYPES), label="logvar dtype")
            lv_shape = _logvar_shape(form, shape)
            layout = "contiguous" if form == "scalar tensor" else data.draw(st.sampled_from(LAYOUTS), label="lv layout")
            logvar = make_tensor(lv_shape, lv_dtype, layout, gen, device=device,
                                 **draw_values(data, lv_dtype, "logvar", huge=HUGE, moderate=GAUSSIAN_LOGVAR_MODERATE,
                                               scale=0.5))
            if form == "per pixel, expanded":
                logvar = logvar.expand(shape)
            kwargs["logvar"] = logvar
            dtype = worst(dtype, lv_dtype)
        kwargs["full"] = full

    out = LOSSES[loss](pred, target, reduction=reduction, backend=backend, **kwargs)

    p64, t64 = pred.double().cpu(), target.double().cpu()
    lv64 = logvar.double().cpu() if logvar is not None else None
    # each element is formed in float32 (inf where its float64 value overflows), then summed
    values = likelihood_reference(loss, p64, t64, lv64, fixed, constant).expand(shape).float().double()
    if loss == "gaussian":
        v = lv64 if lv64 is not None else torch.tensor(fixed, dtype=torch.float64)
        scale = 0.5 * ((t64 - p64) ** 2 * torch.exp(-v) + v.abs()) + constant
    else:
        scale = torch.nn.functional.softplus(p64) + (t64 * p64).abs()
        if loss == "continuous_bernoulli":
            scale = scale + _cb_log_norm(p64).abs()
    scale = scale.expand(shape)
    cols = math.prod(rest)
    assert out.dtype == torch.float32
    assert_close_scaled(out, reduce_like(values, reduction, batch), dtype, VALUE if reduction == "none" else SUM,
                        reduce_like(scale, reduction, batch) + (0 if reduction == "none" else cols * SUM[dtype][0]
                                                                / SUM[dtype][1]), f"{loss} nll ({reduction})")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_likelihood_properties(pair):
    run_examples(pair, _likelihood_case, native=60, triton=50)


# ----------------------------------------------------------------------------- vector quantization


def _true_distances(x64, e64):
    """[N, K] float64 squared distances, written per element, so inf - finite is inf, not NaN."""
    return ((x64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)


def _vq_case(pair, data):
    device, backend = pair
    small = interpreted(pair)
    sizes = [1, 2, 3, 7] if small else [1, 3, 7, 65]  # 65: past a 64-wide tile
    d = data.draw(st.sampled_from(sizes + ([33] if small else [130])), label="D")
    k = data.draw(st.sampled_from(sizes + ([65] if small else [130])), label="K")
    lead = tuple(data.draw(st.lists(st.sampled_from([0, 1, 2, 5] if small else [0, 1, 3, 65]), max_size=2),
                           label="leading dims"))
    x_dtype = data.draw(st.sampled_from(DTYPES), label="x dtype")
    cb_dtype = data.draw(st.sampled_from(DTYPES), label="codebook dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="data seed"))
    x = make_tensor((*lead, d), x_dtype, data.draw(st.sampled_from(LAYOUTS), label="x layout"), gen,
                    **draw_values(data, x_dtype, "x", huge=HUGE), device=device)
    # an expanded codebook repeats one code K times: every row is a tie, which the lowest index wins
    codebook = make_tensor((k, d), cb_dtype, data.draw(st.sampled_from(LAYOUTS), label="codebook layout"), gen,
                           **draw_values(data, cb_dtype, "codebook", huge=HUGE), device=device)
    n = x.numel() // d
    if n and data.draw(st.booleans(), label="rows equal to codes"):
        x = x.clone()
        rows = torch.randint(n, (min(n, 3),), generator=gen)
        x.view(n, d)[rows] = codebook[torch.randint(k, (len(rows),), generator=gen)].to(x_dtype)

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


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_vq_properties(pair):
    run_examples(pair, _vq_case, native=60, triton=15)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_vq_infinite_values(pair):
    """The README's rule: a non-finite expanded distance wins only when no code has a finite one,
    and then code 0; a row with an infinite value is at distance inf, one with NaN at NaN."""
    device, backend = pair
    inf, nan = math.inf, math.nan
    cases = [  # x, codebook, expected indices, expected distances
        ([[0.5], [inf], [-inf], [1.0], [nan]], [[2.0], [-3.0]], [0, 0, 0, 0, 0], [2.25, inf, inf, 1.0, nan]),
        ([[0.5], [-0.5]], [[inf], [-inf]], [0, 0], [inf, inf]),  # every code infinite: code 0
        ([[0.5], [-9.0]], [[inf], [3.0]], [1, 1], [6.25, 144.0]),  # an infinite code loses to a finite one
        ([[inf, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [0], [inf]),  # -inf and NaN expanded distances
    ]
    for x, codebook, want_idx, want_dist in cases:
        idx, dist = pyvae.nearest_code(torch.tensor(x, device=device), torch.tensor(codebook, device=device),
                                       backend=backend)
        assert idx.tolist() == want_idx, (x, codebook)
        torch.testing.assert_close(dist.cpu(), torch.tensor(want_dist), equal_nan=True, msg=str((x, codebook)))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_gaussian_nll_tiny_variance(pair):
    device, backend = pair
    mean = torch.tensor([[0.0, 0.0]], device=device)
    target = torch.tensor([[0.0, 1e-20]], device=device)
    logvar = torch.full((1, 2), -100.0, device=device)
    out = pyvae.gaussian_nll(mean, target, logvar, full=False, reduction="none", backend=backend)
    # The README's limit: below logvar = -88.7, exp(-logvar) overflows float32 on every backend, so
    # the loss is NaN (0 * inf) where target == mean and inf elsewhere, although the float64 formula
    # gives [-50, 1.3e3].
    torch.testing.assert_close(out.cpu(), torch.tensor([[math.nan, math.inf]]), equal_nan=True)
