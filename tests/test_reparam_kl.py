"""pyvae.reparameterize_kl on every backend against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import pyvae
from pyvae.ops.reparam_kl import ReparamKLFunction, reference_eps, reparameterize_kl_reference

from cases import (DTYPES, NATIVE_PAIRS, PAIRS, REDUCTIONS, compile_pairs, devices, needs_native_cpu, no_sync_pairs,
                   pair_id, randn, run_with_cpu_isa, skip_unless_available)
from probes import allocated_bytes, count_launches, held_bytes, no_host_sync
from tolerances import SUM, VALUE, assert_close, assert_close_scaled, noise_scale
import transforms


def make_inputs(shape, dtype, device, gen, requires_grad=False, noncontiguous=False):
    """Fresh random mu, logvar from `gen`; `noncontiguous` gives the chunk-of-a-linear-output layout."""
    if noncontiguous:
        mu, logvar = randn(*shape[:-1], 2 * shape[-1], gen=gen, device=device, dtype=dtype).chunk(2, dim=-1)
        logvar = logvar * 0.5
    else:
        mu = randn(*shape, gen=gen, device=device, dtype=dtype)
        logvar = randn(*shape, gen=gen, device=device, dtype=dtype, scale=0.5)
    if requires_grad:
        mu = mu.detach().requires_grad_()
        logvar = logvar.detach().requires_grad_()
    return mu, logvar


def reference(mu, logvar, seed, n_samples, reduction, prior_mu=None, prior_logvar=None):
    """float64 reference on the exact (already rounded) inputs."""
    z, kl = reparameterize_kl_reference(mu.double(), logvar.double(), torch.tensor(seed, device=mu.device), n_samples,
                                        reduction, None if prior_mu is None else prior_mu.double(),
                                        None if prior_logvar is None else prior_logvar.double())
    return (z[0] if n_samples == 1 else z), kl


def z_scale(mu, logvar, seed, n_samples=1):
    """The tolerance scale of z drawn with `seed` (tolerances.noise_scale)."""
    eps = reference_eps(seed, mu.shape, n_samples)
    return noise_scale(mu, logvar, eps[0] if n_samples == 1 else eps)


# ----------------------------------------------------------------------------- forward values
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (4, 1023), (2, 4097), (2, 3, 7), (16,)], ids=str)
def test_forward_matches_reference(pair, dtype, shape, gen):
    device, backend = pair
    mu, logvar = make_inputs(shape, dtype, device, gen)
    scale = z_scale(mu, logvar, 1234)
    for reduction in REDUCTIONS:
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=1234, reduction=reduction, backend=backend)
        z_ref, kl_ref = reference(mu, logvar, 1234, 1, reduction)
        assert z.dtype == dtype and z.shape == mu.shape
        assert kl.dtype == torch.float32 and kl.shape == kl_ref.shape
        assert_close_scaled(z, z_ref, dtype, VALUE, scale, "z")
        assert_close(kl, kl_ref, dtype, SUM)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("n_samples", [2, 5])
def test_n_samples_and_noncontiguous(pair, n_samples, gen):
    device, backend = pair
    mu, logvar = make_inputs((6, 37), torch.float32, device, gen, noncontiguous=True)
    assert not mu.is_contiguous()
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=99, n_samples=n_samples, reduction="none", backend=backend)
    z_ref, kl_ref = reference(mu, logvar, 99, n_samples, "none")
    assert z.shape == (n_samples, 6, 37)
    assert_close_scaled(z, z_ref, torch.float32, VALUE, z_scale(mu, logvar, 99, n_samples), "z")
    assert_close(kl, kl_ref, torch.float32, SUM)
    # samples are distinct draws
    assert (z[0] - z[1]).abs().min() > 0


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_transposed_input(pair, gen):
    device, backend = pair
    mu = randn(9, 6, gen=gen, device=device).t()  # last dim not unit-stride: served through a copy
    logvar = randn(9, 6, gen=gen, device=device, scale=0.3).t()
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=5, backend=backend)
    z_ref, kl_ref = reference(mu, logvar, 5, 1, "per_sample")
    assert_close_scaled(z, z_ref, torch.float32, VALUE, z_scale(mu, logvar, 5), "z")
    assert_close(kl, kl_ref, torch.float32, SUM)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
def test_transposed_upstream_kl_gradient(pair, prior, gen):
    # a per-element KL read through a transpose: its upstream gradient reaches the op with a
    # column stride of `rows` (the kernels multiply column by stride: 64-bit in Triton)
    device, backend = pair
    mu, logvar = make_inputs((9, 6), torch.float32, device, gen)
    priors = {}
    if prior:
        priors = dict(prior_mu=randn(9, 6, gen=gen, device=device), prior_logvar=randn(6, gen=gen, device=device))
    weight = randn(6, 9, gen=gen, device=device)
    grads = []
    for b in (backend, "torch"):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        _, kl = pyvae.reparameterize_kl(m, lv, seed=3, reduction="none", backend=b, **priors)
        (kl.t() * weight).sum().backward()
        grads.append((m.grad, lv.grad))
    for got, want in zip(*grads):
        assert_close(got, want, torch.float32)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n_samples", [1, 3])
def test_backward_matches_reference(pair, dtype, reduction, n_samples, gen):
    device, backend = pair
    mu, logvar = make_inputs((5, 13), dtype, device, gen, requires_grad=True, noncontiguous=n_samples == 3)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=77, n_samples=n_samples, reduction=reduction, backend=backend)
    gz, gkl = randn(*z.shape, gen=gen, device=device, dtype=z.dtype), randn(*kl.shape, gen=gen, device=device)
    torch.autograd.backward([z, kl], [gz, gkl])

    mu64 = mu.detach().double().requires_grad_()
    logvar64 = logvar.detach().double().requires_grad_()
    z_ref, kl_ref = reparameterize_kl_reference(mu64, logvar64, torch.tensor(77, device=device), n_samples, reduction)
    torch.autograd.backward([z_ref.reshape(z.shape), kl_ref], [gz.double(), gkl.double()])
    scale = 1 + n_samples  # grads sum samples and the KL term
    assert_close(mu.grad, mu64.grad, dtype, VALUE, scale)
    assert_close(logvar.grad, logvar64.grad, dtype, VALUE, scale)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_backward_with_only_one_output_used(pair, gen):
    device, backend = pair
    mu, logvar = make_inputs((4, 9), torch.float32, device, gen, requires_grad=True)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=3, backend=backend)
    kl.sum().backward()
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1), rtol=1e-5, atol=1e-6)
    mu.grad = logvar.grad = None
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=3, backend=backend)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64_torch_backend(reduction, gen):
    mu = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    logvar = (0.3 * torch.randn(3, 5, dtype=torch.float64, generator=gen)).requires_grad_()
    seed = torch.tensor(11)
    fn = lambda m, lv: ReparamKLFunction.apply(m, lv, seed, 2, reduction, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, logvar))


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
def test_autograd_saves_only_inputs_and_seed(backend, gen):
    mu, logvar = make_inputs((64, 256), torch.float32, "cpu", gen, requires_grad=True)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=1, backend=backend)
    saved = z.grad_fn.saved_tensors
    assert len(saved) == 3
    assert sum(t.numel() for t in saved) == 2 * mu.numel() + 1
    # nothing else is held for backward either (no eps, no exp(logvar / 2)): forward keeps its
    # outputs z and kl and the 8-byte seed
    held = held_bytes(lambda: pyvae.reparameterize_kl(mu, logvar, seed=1, backend=backend))
    assert held <= 4 * (mu.numel() + mu.shape[0]) + 64, held


# ----------------------------------------------------------------------------- the noise
@pytest.mark.parametrize("pair", [p for p in PAIRS if not (p[1] == "triton" and p[0] == "cpu")], ids=pair_id)
def test_eps_statistics(pair):
    scipy_stats = pytest.importorskip("scipy.stats")
    device, backend = pair
    n = 200_000
    mu, logvar = torch.zeros(n // 1000, 1000, device=device), torch.zeros(n // 1000, 1000, device=device)
    eps = pyvae.reparameterize_kl(mu, logvar, seed=2024, backend=backend)[0].double().flatten().cpu()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert scipy_stats.kstest(eps.numpy(), "norm").pvalue > 1e-4
    # consecutive elements (same Philox block: cos/sin pairs) are uncorrelated
    assert abs(torch.corrcoef(torch.stack([eps[0::2], eps[1::2]]))[0, 1].item()) < 5 / math.sqrt(n / 2)


def test_eps_statistics_triton_interpreter():
    if "triton" not in pyvae.backends.available("cpu"):
        pytest.skip("triton not available on cpu")
    scipy_stats = pytest.importorskip("scipy.stats")
    mu, logvar = torch.zeros(8, 4096), torch.zeros(8, 4096)
    eps = pyvae.reparameterize_kl(mu, logvar, seed=7, backend="triton")[0].double().flatten()
    assert scipy_stats.kstest(eps.numpy(), "norm").pvalue > 1e-4


def test_reference_stream_is_tl_randn4x_layout():
    """With one sample and cols % 4 == 0 the stream is tl.randn4x(seed, flat_index // 4)."""
    triton = pytest.importorskip("triton")
    if not pyvae.backends.triton_interpreted() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import triton.language as tl

    @triton.jit
    def randn4x_kernel(out_ptr, seed, n_groups, BLOCK: tl.constexpr):
        g = tl.arange(0, BLOCK)
        n0, n1, n2, n3 = tl.randn4x(seed, g.to(tl.int64))
        m = g < n_groups
        tl.store(out_ptr + 4 * g + 0, n0, mask=m)
        tl.store(out_ptr + 4 * g + 1, n1, mask=m)
        tl.store(out_ptr + 4 * g + 2, n2, mask=m)
        tl.store(out_ptr + 4 * g + 3, n3, mask=m)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(4 * 32, device=device)
    randn4x_kernel[(1,)](out, 123456789, 32, BLOCK=32)
    ref = reference_eps(torch.tensor(123456789, device=device), (4, 32))[0].flatten()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_same_seed_same_eps_on_every_backend(gen):
    for device in devices():
        mu, logvar = make_inputs((33, 61), torch.float32, device, gen)
        zs = {b: pyvae.reparameterize_kl(mu, logvar, seed=424242, n_samples=2, backend=b)[0]
              for b in pyvae.backends.available(device)}
        scale = z_scale(mu, logvar, 424242, 2)
        for a in zs:
            for b in zs:  # a few ulps of exp/log/sin/cos apart: 1e-5 of z's terms, no absolute slack
                assert_close_scaled(zs[a], zs[b], torch.float32, {torch.float32: (0.0, 1e-5)}, scale,
                                    f"{device}: {a} against {b}")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_seeds(pair, gen):
    device, backend = pair
    mu, logvar = make_inputs((4, 16), torch.float32, device, gen)
    z1 = pyvae.reparameterize_kl(mu, logvar, seed=1, backend=backend)[0]
    z1b = pyvae.reparameterize_kl(mu, logvar, seed=1, backend=backend)[0]
    z2 = pyvae.reparameterize_kl(mu, logvar, seed=2, backend=backend)[0]
    assert torch.equal(z1, z1b)
    assert (z1 - z2).abs().min() > 0
    # seed=None: drawn from torch's generator, so manual_seed repeats it and fresh calls differ
    torch.manual_seed(0)
    a = pyvae.reparameterize_kl(mu, logvar, backend=backend)[0]
    b = pyvae.reparameterize_kl(mu, logvar, backend=backend)[0]
    torch.manual_seed(0)
    a2 = pyvae.reparameterize_kl(mu, logvar, backend=backend)[0]
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_forward_and_backward_see_the_same_eps(pair, gen):
    device, backend = pair
    mu, logvar = make_inputs((3, 10), torch.float32, device, gen, requires_grad=True)
    z, _ = pyvae.reparameterize_kl(mu, logvar, backend=backend)  # seed drawn internally
    z.backward(torch.ones_like(z))
    # dz/dlogvar = std * eps / 2: the eps of backward gives back the z of forward
    half_noise = logvar.grad.double().cpu()
    eps_backward = 2 * half_noise / (0.5 * logvar.detach().double().cpu()).exp()
    assert_close_scaled(z, mu.detach().double().cpu() + 2 * half_noise, torch.float32, VALUE,
                        noise_scale(mu, logvar, eps_backward), "z from backward's eps")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_deterministic(pair, gen):
    device, backend = pair
    mu, logvar = make_inputs((7, 300), torch.float32, device, gen)
    runs = [pyvae.reparameterize_kl(mu, logvar, seed=8, reduction="sum", backend=backend) for _ in range(3)]
    for z, kl in runs[1:]:
        assert torch.equal(z, runs[0][0]) and torch.equal(kl, runs[0][1])


# ----------------------------------------------------------------------------- edges
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_empty_batches(pair):
    device, backend = pair
    mu = torch.randn(0, 8, device=device)
    z, kl = pyvae.reparameterize_kl(mu, mu, backend=backend)
    assert z.shape == (0, 8) and kl.shape == (0,)
    assert pyvae.reparameterize_kl(mu, mu, reduction="sum", backend=backend)[1].item() == 0
    assert math.isnan(pyvae.reparameterize_kl(mu, mu, reduction="batchmean", backend=backend)[1].item())
    zero_cols = torch.randn(3, 0, device=device)
    z, kl = pyvae.reparameterize_kl(zero_cols, zero_cols, backend=backend)
    assert z.shape == (3, 0) and torch.equal(kl, torch.zeros(3, device=device))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_nan_inf_as_eager(pair):
    device, backend = pair
    special = torch.tensor([0.0, float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 1.0, -1.0], device=device)
    mu, logvar = torch.meshgrid(special, special, indexing="ij")
    mu, logvar = mu.contiguous(), logvar.contiguous()
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=5, reduction="none", backend=backend)
    eps = reference_eps(torch.tensor(5, device=device), mu.shape, 1, torch.float32)[0]
    z_eager = mu + torch.exp(0.5 * logvar) * eps
    kl_eager = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    assert torch.equal(z.isnan(), z_eager.isnan()) and torch.equal(z.isinf(), z_eager.isinf())
    assert torch.equal(kl.isnan(), kl_eager.isnan()) and torch.equal(kl.isinf(), kl_eager.isinf())
    finite = z_eager.isfinite()
    assert_close_scaled(z[finite], z_eager[finite], torch.float32, VALUE, noise_scale(mu, logvar, eps)[finite.cpu()],
                        "finite z")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("used", ["z", "kl"])
def test_backward_nan_inf_as_eager_with_one_output_used(pair, used):
    # The unused output's gradient adds nothing: an infinite std or mu must not turn into 0 * inf = NaN.
    device, backend = pair
    special = torch.tensor([0.0, float("nan"), float("inf"), -float("inf"), 100.0, 200.0, -100.0, 1.0], device=device)
    mu, logvar = (t.contiguous().requires_grad_() for t in torch.meshgrid(special, special, indexing="ij"))
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=5, reduction="none", backend=backend)
    grads = torch.autograd.grad((z if used == "z" else kl).sum(), [mu, logvar])
    eps = reference_eps(torch.tensor(5, device=device), mu.shape, 1, torch.float32)[0]
    out_eager = mu + torch.exp(0.5 * logvar) * eps if used == "z" else -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    for g, g_eager in zip(grads, torch.autograd.grad(out_eager.sum(), [mu, logvar])):
        assert torch.equal(g.isnan(), g_eager.isnan()) and torch.equal(g.isinf(), g_eager.isinf())
        finite = g_eager.isfinite()
        torch.testing.assert_close(g[finite], g_eager[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_autocast(pair):
    device, backend = pair
    layer = torch.nn.Linear(16, 8).to(device)
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        mu, logvar = layer(x).chunk(2, dim=-1)
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=3, backend=backend)
    assert z.dtype == torch.bfloat16 and kl.dtype == torch.float32
    z_ref, kl_ref = reference(mu, logvar, 3, 1, "per_sample")  # on the bf16 values autocast handed over
    assert_close_scaled(z, z_ref, torch.bfloat16, VALUE, z_scale(mu, logvar, 3), "z")
    assert_close(kl, kl_ref, torch.bfloat16, SUM)
    (z.float().sum() + kl.sum()).backward()
    assert layer.weight.grad is not None and layer.weight.grad.isfinite().all()


def test_mixed_dtypes_promote():
    mu = torch.randn(3, 4)
    logvar = torch.randn(3, 4).bfloat16()
    z, _ = pyvae.reparameterize_kl(mu, logvar, seed=1)
    assert z.dtype == torch.float32


def _last_rows_eps(seed, cols, rows, last):
    """eps of the last `last` rows of a [rows, cols] input, from the Philox counters directly."""
    from pyvae.ops import philox
    groups = (cols + 3) // 4
    counter = torch.arange((rows - last) * groups, rows * groups, dtype=torch.int64)
    words = philox.philox_group(torch.tensor(seed), counter, 0)
    u = [philox.uniform(w).double() for w in words]
    out = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2 * torch.log(u1.clamp_min(1e-7)))
        out += [r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)]
    return torch.stack(out, -1).reshape(last, 4 * groups)[:, :cols]


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
def test_more_than_2_31_elements(device, gen):
    """64-bit indexing: a [2^21 + 3, 1024] bf16 input (rows broadcast by stride 0, z is real)."""
    import psutil  # noqa: F401  (skip cleanly where psutil is missing)
    rows, cols = 2**21 + 3, 1024
    free = (torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available)
    if free < 2 * rows * cols * 2 + (1 << 30):
        pytest.skip("not enough memory")
    mu_row = randn(cols, gen=gen, device=device, dtype=torch.bfloat16)
    logvar_row = randn(cols, gen=gen, device=device, dtype=torch.bfloat16, scale=0.3)
    mu, logvar = mu_row.expand(rows, cols), logvar_row.expand(rows, cols)
    backends_here = [b for b in pyvae.backends.available(device) if b in ("cpu", "cuda", "triton")
                     and not (b == "triton" and device == "cpu")]
    eps = _last_rows_eps(2**40 + 5, cols, rows, 2)
    expected = mu_row.double().cpu() + (0.5 * logvar_row.double().cpu()).exp() * eps
    for backend in backends_here:
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=2**40 + 5, backend=backend)
        assert_close_scaled(z[-2:], expected, torch.bfloat16, VALUE, noise_scale(mu_row, logvar_row, eps),
                            f"{backend}: z of the last rows")
        assert torch.equal(kl[-1], kl[0])
        del z, kl


# ----------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 5)), ValueError, "same shape"),
    (dict(mu=torch.randn(3, 4).int(), logvar=torch.randn(3, 4)), TypeError, "mu must be a floating"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randint(0, 3, (3, 4))), TypeError, "logvar must be a floating"),
    (dict(mu=torch.tensor(1.0), logvar=torch.tensor(1.0)), ValueError, "0-d"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), n_samples=0), ValueError, "n_samples must be >= 1"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), n_samples=1.5), TypeError, "n_samples must be an int"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), reduction="avg"), ValueError, "reduction must be one of"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), backend="fast"), ValueError, "backend must be one of"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), backend="cuda"), ValueError, "cannot serve tensors on device 'cpu'"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), seed=-1), ValueError, "seed must be in"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), seed="1"), TypeError, "seed must be None or an int"),
    (dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), seed=2**63), ValueError, "seed must be in"),
    (dict(mu=[1.0], logvar=torch.randn(1)), TypeError, "mu must be a torch.Tensor"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        pyvae.reparameterize_kl(**kwargs)


@pytest.mark.parametrize("backend", [b for b in pyvae.backends.available("cpu") if b != "torch"])
def test_float64_only_on_torch_backend(backend):
    mu = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        pyvae.reparameterize_kl(mu, mu, backend=backend)
    z, kl = pyvae.reparameterize_kl(mu, mu, backend="torch")
    assert z.dtype == torch.float64


def test_different_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    with pytest.raises(ValueError, match="same device|one device"):
        pyvae.reparameterize_kl(torch.randn(2, 3), torch.randn(2, 3, device="cuda"))
    # the raw backward op, called directly: upstream gradients on another device than mu
    if "cuda" in pyvae.backends.available("cuda"):
        mu = torch.randn(2, 3, device="cuda")
        seed = torch.tensor(1, device="cuda")
        with pytest.raises(ValueError, match="grad_kl must be on the device of mu"):
            torch.ops.pyvae.reparam_kl_backward(mu, mu, seed, None, torch.ones(2, 3))
        with pytest.raises(ValueError, match="grad_z must be on the device of mu"):
            torch.ops.pyvae.reparam_kl_backward(mu, mu, seed, torch.ones(1, 2, 3), None)


# ----------------------------------------------------------------------------- registration, compile
def _opcheck_args(device, gen):
    mu, logvar = make_inputs((3, 10), torch.float32, device, gen)
    seed = torch.tensor(5, device=device)  # backward's seed: forward's seed_used
    gz = randn(2, 3, 10, gen=gen, device=device)
    gkl = randn(3, 1, gen=gen, device=device).expand(3, 10)
    return mu, logvar, seed, gz, gkl


def _ops_and_checks(device, backend):
    """The backend's forward and backward ops and the opcheck utilities that apply to them."""
    suffix = "_triton" if backend == "triton" else ""
    checks = {}
    if backend == "triton" and device == "cpu":
        # Triton's interpreter runs kernels even on fake tensors, so the fake-tensor checks need a GPU.
        checks = {"test_utils": ("test_schema", "test_autograd_registration")}
    return (getattr(torch.ops.pyvae, f"reparam_kl_forward{suffix}"),
            getattr(torch.ops.pyvae, f"reparam_kl_backward{suffix}"), checks)


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_opcheck(pair, gen):
    device, backend = pair
    mu, logvar, seed, gz, gkl = _opcheck_args(device, gen)
    fwd, bwd, checks = _ops_and_checks(device, backend)
    for per_element in (False, True):
        torch.library.opcheck(fwd, (mu, logvar, 5, 2, per_element), **checks)
    # seed=None draws inside the op: outputs differ run to run, so only the structural checks apply
    torch.library.opcheck(fwd, (mu, logvar, None, 1, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
                          if not checks else checks["test_utils"])
    torch.library.opcheck(bwd, (mu, logvar, seed, gz, gkl.contiguous()), **checks)
    torch.library.opcheck(bwd, (mu, logvar, seed, None, None), **checks)


@needs_native_cpu()
def test_torch_compile_fullgraph_cpu(gen):
    def loss_fn(mu, logvar):
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=17, reduction="batchmean", backend="cpu")
        return (z ** 2).sum() + kl

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    mu, logvar = make_inputs((4, 12), torch.float32, "cpu", gen, requires_grad=True)
    eager = loss_fn(mu, logvar)
    eager.backward()
    grads = mu.grad.clone(), logvar.grad.clone()
    mu.grad = logvar.grad = None
    out = compiled(mu, logvar)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(mu.grad, grads[0])
    torch.testing.assert_close(logvar.grad, grads[1])


@needs_native_cpu()
def test_torch_compile_fullgraph_drawn_seed(gen):
    compiled = torch.compile(lambda m, lv: pyvae.reparameterize_kl(m, lv, backend="cpu")[0], fullgraph=True)
    mu, logvar = make_inputs((4, 12), torch.float32, "cpu", gen)
    a, b = compiled(mu, logvar), compiled(mu, logvar)
    assert not torch.equal(a, b)  # fresh noise each call


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_draws_fresh_noise(backend, gen):
    if backend not in pyvae.backends.available("cuda"):
        pytest.skip(f"{backend} not available")
    mu, logvar = make_inputs((128, 32), torch.float32, "cuda", gen)
    pyvae.reparameterize_kl(mu, logvar, backend=backend)  # warm up (compile, allocate)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pyvae.reparameterize_kl(mu, logvar, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z, kl = pyvae.reparameterize_kl(mu, logvar, backend=backend)
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(first, z)
    eps = (z - mu) / (0.5 * logvar).exp()
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05


@pytest.mark.parametrize("pair", no_sync_pairs("reparam_kl"), ids=pair_id)
def test_no_host_sync(pair, gen):
    """Forward and backward with a drawn seed, every reduction, without a host synchronisation; then
    what they computed: the KL against the reference (it needs no noise), and gradients consistent
    with the z of the same call (dz/dmu = 1, dz/dlogvar = (z - mu) / 2, plus the KL's terms)."""
    skip_unless_available(pair, "reparam_kl")
    device, backend = pair
    mu, logvar = make_inputs((64, 32), torch.float32, device, gen, requires_grad=True)
    pyvae.reparameterize_kl(mu, logvar, backend=backend)  # compile outside the check
    measured = {}
    with no_host_sync(device):
        for reduction in REDUCTIONS:
            z, kl = pyvae.reparameterize_kl(mu, logvar, reduction=reduction, backend=backend)
            grads = torch.autograd.grad([z, kl], [mu, logvar], [torch.ones_like(z), torch.ones_like(kl)])
            measured[reduction] = (z, kl, *grads)
    m, lv = mu.detach().double().cpu(), logvar.detach().double().cpu()
    for reduction, (z, kl, grad_mu, grad_logvar) in measured.items():
        assert_close(kl.cpu(), reference(m, lv, 0, 1, reduction)[1], torch.float32, SUM)
        factor = {"batchmean": 1 / mu.shape[0], "mean": 1 / mu.numel()}.get(reduction, 1.0)  # d reduction / d element
        noise = z.detach().double().cpu() - m  # std * eps
        assert_close_scaled(grad_mu, 1 + factor * m, torch.float32, VALUE, 1 + factor * m.abs(),
                            f"{reduction}: grad of mu")
        assert_close_scaled(grad_logvar, 0.5 * noise + factor * 0.5 * (lv.exp() - 1), torch.float32, VALUE,
                            0.5 * noise_scale(m, lv, noise / (0.5 * lv).exp()) + factor * 0.5 * (lv.exp() + 1),
                            f"{reduction}: grad of logvar")


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_philox_paths(isa, tmp_path):
    """Every SIMD path of the CPU noise generator (forced by PYVAE_CPU_ISA) draws the reference stream."""
    script = (
        "import torch, pyvae\n"
        "from pyvae.ops.reparam_kl import reference_eps\n"
        "mu = torch.zeros(3, 101); lv = torch.zeros(3, 101)\n"
        "for seed in (0, 2**40 + 12345):\n"
        "    z = pyvae.reparameterize_kl(mu, lv, seed=seed, n_samples=2, backend='cpu')[0]\n"
        "    ref = reference_eps(torch.tensor(seed), mu.shape, 2)\n"
        "    torch.testing.assert_close(z.double(), ref, atol=2e-5, rtol=1e-5)\n"
        "print('ok')\n")
    out = run_with_cpu_isa(isa, script, tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [None, 7])
def test_cuda_backend_is_one_launch(seed, gen):
    """The cuda forward draws its key from the generator state inside the kernel: one launch."""
    if "cuda" not in pyvae.backends.available("cuda"):
        pytest.skip("cuda backend not built")
    mu, logvar = make_inputs((128, 32), torch.float32, "cuda", gen)
    pyvae.reparameterize_kl(mu, logvar, seed=seed, backend="cuda")
    count_launches(lambda: pyvae.reparameterize_kl(mu, logvar, seed=seed, backend="cuda"), expected=1)


# ----------------------------------------------------------------------------- a Gaussian prior
# Layouts of (prior_mu, prior_logvar): "full" (the layer above's [..., Z]), "vector" ([Z], a learned
# per-dimension prior), "row" ([1, Z]), "noncontiguous" (chunks of one [..., 2Z] tensor), "expanded"
# (a [Z] tensor expanded to mu's shape: stride 0), "column" ([..., 1]: one value per sample),
# "leading" (mu's shape without its first dim, for a 3-D mu).
PRIOR_LAYOUTS = ["full", "vector", "row", "noncontiguous", "expanded", "column"]


def make_prior(layout, shape, device, gen, dtype=torch.float32):
    """(leaves, build): fresh random leaf tensors from `gen` and a function of them giving (prior_mu,
    prior_logvar) in `layout` (so that gradients can be compared on the leaves, whatever the view)."""
    z = shape[-1]

    def rand(*s, scale=1.0):
        return randn(*s, gen=gen, device=device, dtype=dtype, scale=scale)

    if layout == "noncontiguous":
        both = torch.cat([rand(*shape[:-1], z), rand(*shape[:-1], z, scale=0.5)], dim=-1)
        return [both], lambda both: tuple(both.chunk(2, dim=-1))
    if layout == "expanded":
        return [rand(z), rand(z, scale=0.5)], lambda pm, plv: (pm.expand(shape), plv.expand(shape))
    pshape = {"full": shape, "vector": (z,), "row": (1,) * (len(shape) - 1) + (z,), "column": (*shape[:-1], 1),
              "leading": shape[1:]}[layout]
    return [rand(*pshape), rand(*pshape, scale=0.5)], lambda pm, plv: (pm, plv)


def literal_prior_kl(mu, logvar, prior_mu, prior_logvar):
    """The issue's formula, term for term (no reformulation): 0.5 (plv - lv + (e^lv + (mu - pmu)^2) / e^plv - 1)."""
    return 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + (mu - prior_mu) ** 2) / torch.exp(prior_logvar) - 1)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", PRIOR_LAYOUTS)
def test_prior_forward_matches_reference(pair, dtype, layout, gen):
    device, backend = pair
    shape = (4, 33)
    mu, logvar = make_inputs(shape, dtype, device, gen)
    leaves, build = make_prior(layout, shape, device, gen, dtype)
    prior_mu, prior_logvar = build(*leaves)
    z_plain, _ = pyvae.reparameterize_kl(mu, logvar, seed=1234, backend=backend)
    for reduction in ("none", "per_sample", "batchmean"):
        z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=1234,
                                        reduction=reduction, backend=backend)
        z_ref, kl_ref = reference(mu, logvar, 1234, 1, reduction, prior_mu, prior_logvar)
        assert z.dtype == dtype and kl.dtype == torch.float32 and kl.shape == kl_ref.shape
        assert torch.equal(z, z_plain)  # the prior changes only the KL: the same noise stream
        assert_close(kl, kl_ref, dtype, SUM)
        assert_close_scaled(z, z_ref, dtype, VALUE, z_scale(mu, logvar, 1234), "z")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("layout", ["full", "vector", "row", "column", "leading"])
def test_prior_three_dims_and_samples(pair, layout, gen):
    device, backend = pair
    shape = (2, 3, 7)
    mu, logvar = make_inputs(shape, torch.float32, device, gen)
    prior_mu, prior_logvar = make_prior(layout, shape, device, gen)[0]
    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=9, n_samples=3,
                                    reduction="none", backend=backend)
    z_ref, kl_ref = reference(mu, logvar, 9, 3, "none", prior_mu, prior_logvar)
    assert z.shape == (3, *shape) and kl.shape == shape
    assert_close_scaled(z, z_ref, torch.float32, VALUE, z_scale(mu, logvar, 9, 3), "z")
    assert_close(kl, kl_ref, torch.float32, SUM)


def test_prior_reference_is_the_literal_formula():
    """The reference's stable form against the issue's formula and torch.distributions, in float64."""
    mu, logvar = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    prior_mu, prior_logvar = torch.randn(9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=1, reduction="none",
                                 backend="torch")[1]
    torch.testing.assert_close(kl, literal_prior_kl(mu, logvar, prior_mu, prior_logvar), rtol=1e-12, atol=1e-12)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(prior_mu.expand_as(mu), (0.5 * prior_logvar).exp())
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", PRIOR_LAYOUTS)
def test_prior_backward_matches_reference(pair, dtype, layout, gen):
    device, backend = pair
    shape, n_samples = (5, 13), 2
    for reduction in ("per_sample", "batchmean"):
        mu, logvar = make_inputs(shape, dtype, device, gen, requires_grad=True)
        leaves, build = make_prior(layout, shape, device, gen, dtype)
        leaves = [leaf.requires_grad_() for leaf in leaves]
        z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=build(*leaves)[0], prior_logvar=build(*leaves)[1],
                                        seed=77, n_samples=n_samples, reduction=reduction, backend=backend)
        gz, gkl = torch.randn_like(z), torch.randn_like(kl)
        grads = torch.autograd.grad([z, kl], [mu, logvar, *leaves], [gz, gkl])

        ref_inputs = [t.detach().double().requires_grad_() for t in (mu, logvar, *leaves)]
        z_ref, kl_ref = reparameterize_kl_reference(ref_inputs[0], ref_inputs[1], torch.tensor(77, device=device),
                                                    n_samples, reduction, *build(*ref_inputs[2:]))
        ref_grads = torch.autograd.grad([z_ref, kl_ref], ref_inputs, [gz.double(), gkl.double()])
        for g, g_ref, t in zip(grads, ref_grads, (mu, logvar, *leaves)):
            assert g.dtype == t.dtype and g.shape == t.shape
            summed = mu.numel() / t.numel()  # rows summed into one prior gradient element
            assert_close(g, g_ref, dtype, VALUE, (1 + n_samples) * 4 * summed)


@pytest.mark.parametrize("layout", ["full", "vector", "column", "expanded"])
@pytest.mark.parametrize("reduction", ["none", "per_sample", "mean"])
def test_prior_gradcheck_float64_torch_backend(layout, reduction, gen):
    shape = (3, 5)
    mu = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    logvar = (0.3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    leaves, build = make_prior(layout, shape, "cpu", gen, torch.float64)
    leaves = [leaf.requires_grad_() for leaf in leaves]
    seed = torch.tensor(11)

    def fn(m, lv, *prior_leaves):
        return ReparamKLFunction.apply(m, lv, seed, 2, reduction, "torch", *build(*prior_leaves))

    assert torch.autograd.gradcheck(fn, (mu, logvar, *leaves))
    # either prior tensor alone
    assert torch.autograd.gradcheck(lambda m, lv, pm: ReparamKLFunction.apply(m, lv, seed, 1, reduction, "torch", pm),
                                    (mu, logvar, leaves[0]))
    assert torch.autograd.gradcheck(
        lambda m, lv, plv: ReparamKLFunction.apply(m, lv, seed, 1, reduction, "torch", None, plv),
        (mu, logvar, leaves[-1]))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_prior_standard_normal_matches_no_prior(pair, gen):
    device, backend = pair
    mu, logvar = make_inputs((6, 37), torch.float32, device, gen, requires_grad=True)
    zeros = torch.zeros(37, device=device, requires_grad=True)
    zeros_row = torch.zeros(1, 37, device=device, requires_grad=True)
    z0, kl0 = pyvae.reparameterize_kl(mu, logvar, seed=4, backend=backend)
    z1, kl1 = pyvae.reparameterize_kl(mu, logvar, prior_mu=zeros, prior_logvar=zeros_row, seed=4, backend=backend)
    z2, kl2 = pyvae.reparameterize_kl(mu, logvar, prior_mu=None, prior_logvar=None, seed=4, backend=backend)
    assert torch.equal(z0, z1) and torch.equal(z0, z2) and torch.equal(kl0, kl2)
    assert_close(kl1, kl0, torch.float32, SUM)
    g0 = torch.autograd.grad((z0.sum() + kl0.sum()), [mu, logvar])
    g1 = torch.autograd.grad((z1.sum() + kl1.sum()), [mu, logvar, zeros, zeros_row])
    for a, b in zip(g0, g1[:2]):
        assert_close(b, a, torch.float32)
    # d/dprior_mu = -(mu - 0), d/dprior_logvar = 0.5 (1 - exp(logvar) - mu^2), summed over the batch
    assert_close(g1[2], -mu.detach().sum(0), torch.float32, SUM)
    assert_close(g1[3][0], (0.5 * (1 - logvar.detach().exp() - mu.detach() ** 2)).sum(0), torch.float32, SUM)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("given", ["prior_mu", "prior_logvar"])
def test_prior_given_alone(pair, given, gen):
    device, backend = pair
    mu, logvar = make_inputs((4, 19), torch.float32, device, gen, requires_grad=True)
    prior = (0.7 * torch.randn(19, device=device)).requires_grad_()
    zero = torch.zeros(19, device=device)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=2, reduction="none", backend=backend, **{given: prior})
    full = dict(prior_mu=zero, prior_logvar=zero)
    full[given] = prior.detach()
    z_ref, kl_ref = reference(mu.detach(), logvar.detach(), 2, 1, "none", full["prior_mu"], full["prior_logvar"])
    assert_close(kl, kl_ref, torch.float32, SUM)
    (grad,) = torch.autograd.grad(kl.sum(), [prior])
    pm, plv = full["prior_mu"].double(), full["prior_logvar"].double()
    m, lv = mu.detach().double(), logvar.detach().double()
    if given == "prior_mu":
        expected = (-(m - pm) * torch.exp(-plv)).sum(0)
    else:
        expected = (0.5 * (1 - torch.exp(lv - plv) - (m - pm) ** 2 * torch.exp(-plv))).sum(0)
    assert_close(grad, expected, torch.float32, SUM)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_prior_large_logvar_difference_is_stable(pair):
    """Finite KL and gradients where the literal float32 formula overflows (inf / inf, inf * 0)."""
    device, backend = pair
    # (mu, logvar, prior_mu, prior_logvar)
    cases = torch.tensor([
        [0.5, 100.0, 0.0, 100.0],     # e^lv / e^plv = inf / inf in float32; KL ~ 0.125 e^-100
        [0.0, 89.0, 0.0, 0.0],        # e^89 overflows, half of it (the KL) does not
        [1e-20, -50.0, 0.0, -100.0],  # e^-plv overflows; (mu - prior_mu)^2 e^-plv = 2.7e3 does not
        [3.0, -80.0, 1.0, 80.0],      # logvar - prior_logvar = -160
        [2.0, 60.0, -1.0, -20.0],     # logvar - prior_logvar = 80
        [0.0, -100.0, 0.0, -100.0],   # tiny variances, equal
        [5.0, -170.0, 5.0, -170.0],   # a prior variance that is 0 in float32, mu = prior_mu
        [5.0, -190.0, 5.0, -200.0],   # ... and exp(-prior_logvar / 2) overflows too
    ], device=device)
    mu, logvar, prior_mu, prior_logvar = (c.contiguous().view(1, -1).requires_grad_() for c in cases.t())
    literal = literal_prior_kl(mu.detach(), logvar.detach(), prior_mu.detach(), prior_logvar.detach())
    assert not literal.isfinite().all()  # the naive formula fails here
    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=3,
                                    reduction="none", backend=backend)
    ref = [t.detach().double().requires_grad_() for t in (mu, logvar, prior_mu, prior_logvar)]
    kl_ref = reference(*ref[:2], 3, 1, "none", *ref[2:])[1]
    assert kl.isfinite().all(), kl
    torch.testing.assert_close(kl.double(), kl_ref, rtol=2e-5, atol=1e-5)
    grads = torch.autograd.grad(kl.sum(), [mu, logvar, prior_mu, prior_logvar])
    ref_grads = torch.autograd.grad(kl_ref.sum(), ref)
    for g, g_ref in zip(grads, ref_grads):
        finite = g_ref.float().isfinite()
        assert torch.equal(g.isfinite(), finite), (g, g_ref)
        torch.testing.assert_close(g[finite].double(), g_ref[finite], rtol=2e-5, atol=1e-5)


SPECIAL = [0.0, float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 1.0, -1.0]


def _special_grid(device, values=SPECIAL):
    grid = torch.cartesian_prod(*[torch.tensor(values, device=device)] * 4)
    return [c.contiguous().view(-1, len(values) ** 2) for c in grid.t()]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_prior_nan_inf_as_the_formula(pair):
    """NaN and inf where the formula (in exact arithmetic, rounded to float32) has them: every
    combination of special values in the four inputs."""
    device, backend = pair
    mu, logvar, prior_mu, prior_logvar = _special_grid(device)
    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=5,
                                    reduction="none", backend=backend)
    expected = literal_prior_kl(*(t.double() for t in (mu, logvar, prior_mu, prior_logvar))).float()
    assert torch.equal(kl.isnan(), expected.isnan())
    assert torch.equal(kl.isinf(), expected.isinf()) and torch.equal(kl[kl.isinf()], expected[expected.isinf()])
    finite = expected.isfinite()
    torch.testing.assert_close(kl[finite], expected[finite], rtol=1e-5, atol=1e-5)
    z_plain = pyvae.reparameterize_kl(mu, logvar, seed=5, backend=backend)[0]
    assert torch.equal(z.isnan(), z_plain.isnan()) and torch.equal(z.nan_to_num(), z_plain.nan_to_num())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_prior_backward_nan_inf_as_the_formula(pair):
    """Gradients of the KL over finite extremes and NaN: NaN, inf and finite where the float64
    derivatives (rounded to float32) have them."""
    device, backend = pair
    inputs = [t.requires_grad_() for t in _special_grid(device, [0.0, float("nan"), 100.0, -100.0, 1.0, -1.0])]
    kl = pyvae.reparameterize_kl(*inputs[:2], prior_mu=inputs[2], prior_logvar=inputs[3], seed=5, reduction="none",
                                 backend=backend)[1]
    grads = torch.autograd.grad(kl.sum(), inputs)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(literal_prior_kl(*ref).sum(), ref)
    for name, g, g_ref in zip(("mu", "logvar", "prior_mu", "prior_logvar"), grads, ref_grads):
        g_ref = g_ref.float()
        assert torch.equal(g.isnan(), g_ref.isnan()), name
        assert torch.equal(g.isinf(), g_ref.isinf()) and torch.equal(g[g.isinf()], g_ref[g_ref.isinf()]), name
        finite = g_ref.isfinite()
        torch.testing.assert_close(g[finite], g_ref[finite], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_prior_empty_batch(pair):
    device, backend = pair
    mu = torch.randn(0, 8, device=device, requires_grad=True)
    prior_mu = torch.randn(8, device=device, requires_grad=True)
    z, kl = pyvae.reparameterize_kl(mu, mu, prior_mu=prior_mu, reduction="sum", backend=backend)
    assert z.shape == (0, 8) and kl.item() == 0
    (grad,) = torch.autograd.grad(kl, [prior_mu])
    assert torch.equal(grad, torch.zeros(8, device=device))


def test_prior_dtype_cast_and_gradient_dtype():
    """A float32 prior with a bfloat16 mu: the KL reads it in mu's dtype; its gradient is float32."""
    mu = torch.randn(3, 8).bfloat16().requires_grad_()
    logvar = torch.randn(3, 8).bfloat16().requires_grad_()
    prior_mu = torch.randn(8, requires_grad=True)
    z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, seed=1)
    assert z.dtype == torch.bfloat16 and kl.dtype == torch.float32
    kl.sum().backward()
    assert prior_mu.grad.dtype == torch.float32 and prior_mu.grad.shape == (8,)
    assert_close(prior_mu.grad, -(mu.detach().double() - prior_mu.detach().bfloat16().double()).sum(0),
                 torch.bfloat16)


def test_prior_autograd_saves_only_inputs_and_seed(gen):
    mu, logvar = make_inputs((64, 256), torch.float32, "cpu", gen, requires_grad=True)
    prior_mu = randn(256, gen=gen).requires_grad_()
    prior_logvar = randn(64, 256, gen=gen).requires_grad_()

    def call():
        return pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=1)

    saved = call()[0].grad_fn.saved_tensors
    assert len(saved) == 5
    assert sum(t.numel() for t in saved) == 3 * mu.numel() + 256 + 1
    assert held_bytes(call) <= 4 * (mu.numel() + mu.shape[0]) + 64  # z, kl and the seed: nothing more


@needs_native_cpu()
def test_prior_broadcast_not_materialised_cpu(gen):
    """The C++ op reads a [Z] or [1, Z] prior in place: forward allocates what it does without a
    prior (z, kl, the seed), nothing of mu's size more."""
    mu, logvar = make_inputs((512, 256), torch.float32, "cpu", gen)
    prior_mu, prior_logvar = randn(256, gen=gen), randn(1, 256, gen=gen)

    def allocated(**prior):
        return allocated_bytes(lambda: pyvae.reparameterize_kl(mu, logvar, seed=1, backend="cpu", **prior))

    plain = allocated()
    assert plain >= mu.numel() * 4  # z is seen
    assert allocated(prior_mu=prior_mu, prior_logvar=prior_logvar) <= plain + 4096


def test_prior_broadcast_read_in_place():
    """The kernels read a broadcast prior through a stride-0 view of its own memory (no B x Z copy)."""
    from pyvae.kernels._layout import as_rows_broadcast
    prior = torch.randn(16)
    for p in (prior, prior.view(1, 16), prior.expand(64, 16)):
        rows = as_rows_broadcast(p, torch.Size((64, 16)), 64, 16)
        assert rows.data_ptr() == prior.data_ptr() and rows.stride() == (0, 1)
    column = torch.randn(64, 1)
    rows = as_rows_broadcast(column, torch.Size((64, 16)), 64, 16)
    assert rows.data_ptr() == column.data_ptr() and rows.stride() == (1, 0)


PRIOR_BAD_INPUTS = [
    (dict(prior_mu=torch.randn(3, 5)), ValueError, r"prior_mu of shape \(3, 5\) does not broadcast"),
    (dict(prior_logvar=torch.randn(2, 3, 4)), ValueError, r"prior_logvar of shape \(2, 3, 4\) does not broadcast"),
    (dict(prior_logvar=torch.randn(4, 4)), ValueError, "prior_logvar of shape"),
    (dict(prior_mu=torch.randint(0, 3, (4,))), TypeError, "prior_mu must be a floating"),
    (dict(prior_logvar=torch.ones(4, dtype=torch.bool)), TypeError, "prior_logvar must be a floating"),
    (dict(prior_mu=[0.0] * 4), TypeError, "prior_mu must be None or a torch.Tensor"),
    (dict(prior_logvar=0.0), TypeError, "prior_logvar must be None or a torch.Tensor"),
    (dict(prior_mu=torch.randn(4, device="meta")), ValueError, "prior_mu is on meta"),
    (dict(prior_mu=torch.randn(4), prior_logvar=torch.randn(4, device="meta")), ValueError, "prior_logvar is on meta"),
]


@pytest.mark.parametrize("kwargs,error,message", PRIOR_BAD_INPUTS, ids=[m for _, _, m in PRIOR_BAD_INPUTS])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_prior_bad_input(kwargs, error, message, backend):
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(error, match=message):
        pyvae.reparameterize_kl(mu, logvar, backend=backend, **kwargs)


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_prior_opcheck(pair, gen):
    device, backend = pair
    mu, logvar, seed, gz, gkl = _opcheck_args(device, gen)
    prior_mu = torch.randn(3, 10, device=device)
    prior_logvar = (0.5 * torch.randn(10, device=device)).expand(3, 10)  # stride 0, read in place
    fwd, bwd, checks = _ops_and_checks(device, backend)
    for per_element in (False, True):
        torch.library.opcheck(fwd, (mu, logvar, 5, 2, per_element, prior_mu, prior_logvar), **checks)
    torch.library.opcheck(fwd, (mu, logvar, 5, 1, False, None, prior_logvar[0]), **checks)
    gkl = gkl.contiguous()
    torch.library.opcheck(bwd, (mu, logvar, seed, gz, gkl, prior_mu, prior_logvar, True, True), **checks)
    torch.library.opcheck(bwd, (mu, logvar, seed, None, gkl, prior_mu[:1], None, True, False), **checks)
    torch.library.opcheck(bwd, (mu, logvar, seed, gz, None, prior_mu, prior_logvar[0], True, True), **checks)
    # the raw ops check what the Python API checks too
    with pytest.raises((ValueError, RuntimeError), match="broadcast"):
        fwd(mu, logvar, 5, 1, False, torch.randn(4, device=device), None)


@needs_native_cpu()
def test_prior_torch_compile_fullgraph_cpu(gen):
    def loss_fn(mu, logvar, prior_mu, prior_logvar):
        z, kl = pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, seed=17,
                                        reduction="batchmean", backend="cpu")
        return (z ** 2).sum() + kl

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    mu, logvar = make_inputs((4, 12), torch.float32, "cpu", gen, requires_grad=True)
    prior_mu = torch.randn(4, 12, requires_grad=True)
    prior_logvar = (0.5 * torch.randn(12)).requires_grad_()
    inputs = [mu, logvar, prior_mu, prior_logvar]
    eager = loss_fn(*inputs)
    grads = torch.autograd.grad(eager, inputs)
    out = compiled(*inputs)
    compiled_grads = torch.autograd.grad(out, inputs)
    torch.testing.assert_close(out, eager)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- higher order, torch.func, compile
def _reparam(backend, mu, logvar, prior_mu=None, prior_logvar=None, n_samples=1, reduction="per_sample"):
    return pyvae.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, n_samples=n_samples,
                                   seed=7, reduction=reduction, backend=backend)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
def test_gradgradcheck_float64_reference(reduction, prior, gen):
    mu, logvar = (0.5 * torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)).unbind()
    inputs = [mu, logvar] + ([torch.randn(5, dtype=torch.float64, generator=gen),
                              0.3 * torch.randn(3, 5, dtype=torch.float64, generator=gen)] if prior else [])
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda *xs: _reparam("torch", *xs, n_samples=2, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
@pytest.mark.parametrize("reduction", ["per_sample", "batchmean", "none"])
def test_second_order_gradients_match_reference(backend, prior, reduction, gen):
    # the fused backends once gave all-zero second-order gradients, with only a warning
    inputs = [randn(4, 8, gen=gen), randn(4, 8, gen=gen, scale=0.5)]
    if prior:
        inputs += [randn(8, gen=gen), randn(4, 8, gen=gen, scale=0.5)]
    fn = lambda b, *xs: _reparam(b, *xs, n_samples=2, reduction=reduction)  # noqa: E731
    transforms.assert_second_order_matches_reference(fn, backend, inputs)


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
def test_torch_func_transforms_match_loop(backend, prior, gen):
    # the same seed draws the same noise for every vmapped slice, as in a loop of calls
    batched = [randn(3, 4, 8, gen=gen), randn(3, 4, 8, gen=gen, scale=0.5)]
    if prior:
        batched += [randn(3, 8, gen=gen), randn(3, 4, 8, gen=gen, scale=0.5)]
    transforms.assert_func_transforms_match_loop(_reparam, backend, batched)


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
def test_vmap_randomness_without_seed(backend, gen):
    mu, logvar = randn(3, 4, 8, gen=gen), randn(3, 4, 8, gen=gen, scale=0.5)

    def noise(m, lv):
        z, _ = pyvae.reparameterize_kl(m, lv, backend=backend)
        return (z - m) / torch.exp(0.5 * lv)

    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(noise)(mu, logvar)
    same = torch.func.vmap(noise, randomness="same")(mu, logvar)
    torch.testing.assert_close(same[1], same[0], atol=1e-5, rtol=1e-5)
    different = torch.func.vmap(noise, randomness="different")(mu, logvar)
    assert (different[1] - different[0]).abs().max() > 0.1
    assert 0.5 < different.std() < 1.5


@pytest.mark.parametrize("pair", compile_pairs("reparam_kl"), ids=pair_id)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
def test_compiles_in_bounded_time_without_recompiles(pair, dynamic, prior):
    device, backend = pair
    # a constant seed made Inductor run for minutes (the torch backend's Philox rounds, traced)
    def make(size):
        gen = torch.Generator().manual_seed(size)
        rows = 4 + size
        tensors = [randn(rows, 8, gen=gen), randn(rows, 8, gen=gen, scale=0.5)]
        tensors += [randn(8, gen=gen), randn(rows, 8, gen=gen, scale=0.5)] if prior else []
        return [t.to(device) for t in tensors]

    transforms.assert_compiles_once(lambda b, *xs: _reparam(b, *xs, reduction="batchmean"), backend, make, dynamic)
