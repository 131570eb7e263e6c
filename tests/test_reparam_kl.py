"""pyvae.reparameterize_kl on every backend against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import pyvae
from pyvae.ops.reparam_kl import ReparamKLFunction, reference_eps, reparameterize_kl_reference

from conftest import device_backends, devices, run_with_cpu_isa
from tolerances import SUM, VALUE, assert_close

REDUCTIONS = ["none", "per_sample", "sum", "batchmean", "mean"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAIRS = device_backends()
NATIVE_PAIRS = [(d, b) for d, b in PAIRS if b != "torch"]


def pair_id(pair):
    return f"{pair[0]}-{pair[1]}"


def make_inputs(shape, dtype, device, requires_grad=False, noncontiguous=False):
    """Fresh random mu, logvar; `noncontiguous` gives the chunk-of-a-linear-output layout."""
    if noncontiguous:
        both = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=torch.float32)
        mu, logvar = both.to(dtype).chunk(2, dim=-1)
        logvar = logvar * 0.5
    else:
        mu = torch.randn(shape, device=device).to(dtype)
        logvar = (0.5 * torch.randn(shape, device=device)).to(dtype)
    if requires_grad:
        mu = mu.detach().requires_grad_()
        logvar = logvar.detach().requires_grad_()
    return mu, logvar


def reference(mu, logvar, seed, n_samples, reduction):
    """float64 reference on the exact (already rounded) inputs."""
    z, kl = reparameterize_kl_reference(mu.double(), logvar.double(), torch.tensor(seed, device=mu.device),
                                        n_samples, reduction)
    return (z[0] if n_samples == 1 else z), kl


def skip_slow_interpreter(backend, device, numel):
    if backend == "triton" and device == "cpu" and numel > 40_000:
        pytest.skip("too large for the Triton interpreter")


# ----------------------------------------------------------------------------- forward values
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (4, 1023), (2, 4097), (2, 3, 7), (16,)], ids=str)
def test_forward_matches_reference(pair, dtype, shape):
    device, backend = pair
    mu, logvar = make_inputs(shape, dtype, device)
    for reduction in REDUCTIONS:
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=1234, reduction=reduction, backend=backend)
        z_ref, kl_ref = reference(mu, logvar, 1234, 1, reduction)
        assert z.dtype == dtype and z.shape == mu.shape
        assert kl.dtype == torch.float32 and kl.shape == kl_ref.shape
        assert_close(z, z_ref, dtype, VALUE)
        assert_close(kl, kl_ref, dtype, SUM)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("n_samples", [2, 5])
def test_n_samples_and_noncontiguous(pair, n_samples):
    device, backend = pair
    mu, logvar = make_inputs((6, 37), torch.float32, device, noncontiguous=True)
    assert not mu.is_contiguous()
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=99, n_samples=n_samples, reduction="none", backend=backend)
    z_ref, kl_ref = reference(mu, logvar, 99, n_samples, "none")
    assert z.shape == (n_samples, 6, 37)
    assert_close(z, z_ref, torch.float32)
    assert_close(kl, kl_ref, torch.float32, SUM)
    # samples are distinct draws
    assert (z[0] - z[1]).abs().min() > 0


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_transposed_input(pair):
    device, backend = pair
    mu = torch.randn(9, 6, device=device).t()  # last dim not unit-stride: served through a copy
    logvar = torch.randn(9, 6, device=device).t() * 0.3
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=5, backend=backend)
    z_ref, kl_ref = reference(mu, logvar, 5, 1, "per_sample")
    assert_close(z, z_ref, torch.float32)
    assert_close(kl, kl_ref, torch.float32, SUM)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n_samples", [1, 3])
def test_backward_matches_reference(pair, dtype, reduction, n_samples):
    device, backend = pair
    mu, logvar = make_inputs((5, 13), dtype, device, requires_grad=True, noncontiguous=n_samples == 3)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=77, n_samples=n_samples, reduction=reduction, backend=backend)
    gz, gkl = torch.randn_like(z), torch.randn_like(kl)
    torch.autograd.backward([z, kl], [gz, gkl])

    mu64 = mu.detach().double().requires_grad_()
    logvar64 = logvar.detach().double().requires_grad_()
    z_ref, kl_ref = reparameterize_kl_reference(mu64, logvar64, torch.tensor(77, device=device), n_samples, reduction)
    torch.autograd.backward([z_ref.reshape(z.shape), kl_ref], [gz.double(), gkl.double()])
    scale = 1 + n_samples  # grads sum samples and the KL term
    assert_close(mu.grad, mu64.grad, dtype, VALUE, scale)
    assert_close(logvar.grad, logvar64.grad, dtype, VALUE, scale)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_backward_with_only_one_output_used(pair):
    device, backend = pair
    mu, logvar = make_inputs((4, 9), torch.float32, device, requires_grad=True)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=3, backend=backend)
    kl.sum().backward()
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1), rtol=1e-5, atol=1e-6)
    mu.grad = logvar.grad = None
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=3, backend=backend)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64_torch_backend(reduction):
    mu = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    logvar = (0.3 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_()
    seed = torch.tensor(11)
    fn = lambda m, lv: ReparamKLFunction.apply(m, lv, seed, 2, reduction, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, logvar))


def test_autograd_saves_only_inputs_and_seed():
    mu, logvar = make_inputs((4, 8), torch.float32, "cpu", requires_grad=True)
    z, kl = pyvae.reparameterize_kl(mu, logvar, seed=1, backend=pyvae.backends.resolve("auto", torch.device("cpu"), "reparam_kl"))
    saved = z.grad_fn.saved_tensors
    assert len(saved) == 3
    assert sum(t.numel() for t in saved) == 2 * mu.numel() + 1


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


def test_same_seed_same_eps_on_every_backend():
    for device in devices():
        mu, logvar = make_inputs((33, 61), torch.float32, device)
        zs = {b: pyvae.reparameterize_kl(mu, logvar, seed=424242, n_samples=2, backend=b)[0]
              for b in pyvae.backends.available(device)}
        eps = reference_eps(torch.tensor(424242, device=device), mu.shape, 2)
        magnitude = mu.abs().double() + (0.5 * logvar.double()).exp() * eps.abs()
        for a in zs:
            for b in zs:
                rel = ((zs[a].double() - zs[b].double()).abs() / magnitude).max().item()
                assert rel < 1e-5, (device, a, b, rel)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_seeds(pair):
    device, backend = pair
    mu, logvar = make_inputs((4, 16), torch.float32, device)
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
def test_forward_and_backward_see_the_same_eps(pair):
    device, backend = pair
    mu, logvar = make_inputs((3, 10), torch.float32, device, requires_grad=True)
    z, _ = pyvae.reparameterize_kl(mu, logvar, backend=backend)  # seed drawn internally
    z.backward(torch.ones_like(z))
    std = (0.5 * logvar.detach()).exp()
    eps_forward = (z.detach() - mu.detach()) / std
    eps_backward = 2 * logvar.grad / std
    torch.testing.assert_close(eps_backward, eps_forward, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_deterministic(pair):
    device, backend = pair
    mu, logvar = make_inputs((7, 300), torch.float32, device)
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
    torch.testing.assert_close(z[finite], z_eager[finite], rtol=1e-5, atol=1e-5)


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
    (z.float().sum() + kl.sum()).backward()
    assert layer.weight.grad is not None and layer.weight.grad.isfinite().all()


def test_mixed_dtypes_promote():
    mu = torch.randn(3, 4)
    logvar = torch.randn(3, 4).bfloat16()
    z, _ = pyvae.reparameterize_kl(mu, logvar, seed=1)
    assert z.dtype == torch.float32


def _last_rows_reference(seed, mu_row, logvar_row, rows, last):
    """eps of the last `last` rows of a [rows, cols] input, from the Philox counters directly."""
    from pyvae.ops import reparam_kl as rk
    cols = mu_row.shape[-1]
    groups = (cols + 3) // 4
    counter = torch.arange((rows - last) * groups, rows * groups, dtype=torch.int64)
    words = rk._philox4x32_10(counter & rk._MASK32, counter >> 32, torch.zeros_like(counter), torch.zeros_like(counter),
                              torch.tensor(seed & rk._MASK32), torch.tensor(seed >> 32))
    u = [rk._uniform(w).double() for w in words]
    out = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2 * torch.log(u1.clamp_min(1e-7)))
        out += [r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)]
    eps = torch.stack(out, -1).reshape(last, 4 * groups)[:, :cols]
    return mu_row.double() + (0.5 * logvar_row.double()).exp() * eps


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
def test_more_than_2_31_elements(device):
    """64-bit indexing: a [2^21 + 3, 1024] bf16 input (rows broadcast by stride 0, z is real)."""
    import psutil  # noqa: F401  (skip cleanly where psutil is missing)
    rows, cols = 2**21 + 3, 1024
    free = (torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available)
    if free < 2 * rows * cols * 2 + (1 << 30):
        pytest.skip("not enough memory")
    mu_row = torch.randn(cols, device=device).bfloat16()
    logvar_row = (0.3 * torch.randn(cols, device=device)).bfloat16()
    mu, logvar = mu_row.expand(rows, cols), logvar_row.expand(rows, cols)
    backends_here = [b for b in pyvae.backends.available(device) if b in ("cpu", "cuda", "triton")
                     and not (b == "triton" and device == "cpu")]
    for backend in backends_here:
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=2**40 + 5, backend=backend)
        expected = _last_rows_reference(2**40 + 5, mu_row.cpu(), logvar_row.cpu(), rows, 2)
        assert_close(z[-2:].cpu(), expected, torch.bfloat16)
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


def test_bad_input_leaves_no_partial_output():
    """Errors are raised before any kernel runs: the caller's tensors are untouched."""
    mu = torch.randn(3, 4)
    before = mu.clone()
    with pytest.raises(ValueError):
        pyvae.reparameterize_kl(mu, torch.randn(3, 5))
    assert torch.equal(mu, before)


# ----------------------------------------------------------------------------- registration, compile
def _opcheck_args(device):
    mu, logvar = make_inputs((3, 10), torch.float32, device)
    seed = torch.tensor(5, device=device)  # backward's seed: forward's seed_used
    gz = torch.randn(2, 3, 10, device=device)
    gkl = torch.randn(3, 1, device=device).expand(3, 10)
    return mu, logvar, seed, gz, gkl


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_opcheck(pair):
    device, backend = pair
    mu, logvar, seed, gz, gkl = _opcheck_args(device)
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.pyvae, f"reparam_kl_forward{suffix}")
    bwd = getattr(torch.ops.pyvae, f"reparam_kl_backward{suffix}")
    checks = {}
    if backend == "triton" and device == "cpu":
        # Triton's interpreter runs kernels even on fake tensors, so the fake-tensor checks need a GPU.
        checks = {"test_utils": ("test_schema", "test_autograd_registration")}
    for per_element in (False, True):
        torch.library.opcheck(fwd, (mu, logvar, 5, 2, per_element), **checks)
    # seed=None draws inside the op: outputs differ run to run, so only the structural checks apply
    torch.library.opcheck(fwd, (mu, logvar, None, 1, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
                          if not checks else checks["test_utils"])
    torch.library.opcheck(bwd, (mu, logvar, seed, gz, gkl.contiguous()), **checks)
    torch.library.opcheck(bwd, (mu, logvar, seed, None, None), **checks)


def test_torch_compile_fullgraph_cpu():
    if "cpu" not in pyvae.backends.available("cpu"):
        pytest.skip("extension not built")

    def loss_fn(mu, logvar):
        z, kl = pyvae.reparameterize_kl(mu, logvar, seed=17, reduction="batchmean", backend="cpu")
        return (z ** 2).sum() + kl

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    mu, logvar = make_inputs((4, 12), torch.float32, "cpu", requires_grad=True)
    eager = loss_fn(mu, logvar)
    eager.backward()
    grads = mu.grad.clone(), logvar.grad.clone()
    mu.grad = logvar.grad = None
    out = compiled(mu, logvar)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(mu.grad, grads[0])
    torch.testing.assert_close(logvar.grad, grads[1])


def test_torch_compile_fullgraph_drawn_seed():
    if "cpu" not in pyvae.backends.available("cpu"):
        pytest.skip("extension not built")
    compiled = torch.compile(lambda m, lv: pyvae.reparameterize_kl(m, lv, backend="cpu")[0], fullgraph=True)
    mu, logvar = make_inputs((4, 12), torch.float32, "cpu")
    a, b = compiled(mu, logvar), compiled(mu, logvar)
    assert not torch.equal(a, b)  # fresh noise each call


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_draws_fresh_noise(backend):
    if backend not in pyvae.backends.available("cuda"):
        pytest.skip(f"{backend} not available")
    mu, logvar = make_inputs((128, 32), torch.float32, "cuda")
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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync(backend):
    if backend not in pyvae.backends.available("cuda"):
        pytest.skip(f"{backend} not available")
    mu, logvar = make_inputs((64, 32), torch.float32, "cuda", requires_grad=True)
    pyvae.reparameterize_kl(mu, logvar, backend=backend)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in REDUCTIONS:
            z, kl = pyvae.reparameterize_kl(mu, logvar, reduction=reduction, backend=backend)
            torch.autograd.backward([z, kl], [torch.ones_like(z), torch.ones_like(kl)])
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
def test_cuda_backend_is_one_launch(seed):
    """The cuda forward draws its key from the generator state inside the kernel: one launch."""
    if "cuda" not in pyvae.backends.available("cuda"):
        pytest.skip("cuda backend not built")
    from torch.profiler import ProfilerActivity, profile
    mu, logvar = make_inputs((128, 32), torch.float32, "cuda")
    pyvae.reparameterize_kl(mu, logvar, seed=seed, backend="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pyvae.reparameterize_kl(mu, logvar, seed=seed, backend="cuda")
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, kernels
