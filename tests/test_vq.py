"""Vector quantisation (nearest_code, vector_quantize, codebook_stats) against float64."""
from __future__ import annotations

import math

import pytest
import torch

import pyvae
from pyvae.ops.vq import VQFunction

from cases import (PAIRS, compile_pairs, needs_native_cpu, no_sync_pairs, pair_id, randn, skip_if_interpreted,
                   skip_unless_available)
from families.vq import VQ_BACKENDS
from probes import no_host_sync
import transforms
from tolerances import assert_nearest_codes


def vq_reference(x, codebook, indices, beta):
    """(quantized, codebook_loss, commitment_loss, loss) from their detach()-based definitions, in the
    inputs' dtype and differentiable in both (VQ-VAE's straight-through estimator)."""
    q = codebook[indices]
    codebook_loss = ((x.detach() - q) ** 2).mean()
    commitment = ((x - q.detach()) ** 2).mean()
    return x + (q - x).detach(), codebook_loss, commitment, codebook_loss + beta * commitment


@pytest.mark.parametrize("backend", VQ_BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (4097, 5, 7), (300, 1000, 64), (64, 37, 1000), (0, 5, 3)])
def test_nearest_code_exact(backend, n, k, d):
    skip_if_interpreted(("cpu", backend), n * k * d, limit=3_000_000)
    x, codebook = torch.randn(n, d), torch.randn(k, d)
    idx, dist = pyvae.nearest_code(x, codebook, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == (n,) and dist.dtype == torch.float32
    if n:
        assert_nearest_codes(x, codebook, idx)
        expected = ((x.double() - codebook.double()[idx]) ** 2).sum(1)
        torch.testing.assert_close(dist.double(), expected, rtol=1e-4, atol=1e-4 * d)


@pytest.mark.parametrize("backend", VQ_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_shapes(backend, dtype):
    x = torch.randn(3, 4, 5, 16).to(dtype)[:, :, ::2]  # 4-D, non-contiguous
    codebook = torch.randn(40, 32).to(dtype)[:, ::2]  # non-contiguous codebook
    idx, dist = pyvae.nearest_code(x, codebook, backend=backend)
    assert idx.shape == (3, 4, 3)
    # accumulation is float32 over the rounded inputs: compare with float64 on the same values
    assert_nearest_codes(x.float(), codebook.float(), idx)


@pytest.mark.skipif("triton" not in VQ_BACKENDS, reason="needs the triton backend")
def test_triton_search_config_override(monkeypatch):
    # Every block shape must give the same answer: ragged tails in rows, codes and dims, and ties.
    torch.manual_seed(0)
    x, codebook = torch.randn(70, 37), torch.randn(90, 37)
    codebook[50] = codebook[3]  # a tie: code 3 must win
    x[5] = codebook[3]
    reference = pyvae.nearest_code(x, codebook, backend="triton")
    assert reference[0][5] == 3
    for spec in ("16,32,16,4,2", "32,16,64,8,3"):
        monkeypatch.setenv("PYVAE_VQ_TRITON_CONFIG", spec)
        idx, dist = pyvae.nearest_code(x, codebook, backend="triton")
        assert torch.equal(idx, reference[0])
        # the expansion |x|^2 - 2 x.e + |e|^2 rounds differently per block shape (|x|^2 ~ 37 here)
        torch.testing.assert_close(dist, reference[1], rtol=1e-5, atol=1e-3)
    monkeypatch.setenv("PYVAE_VQ_TRITON_CONFIG", "64,24,16,4,3")
    with pytest.raises(ValueError, match="PYVAE_VQ_TRITON_CONFIG"):
        pyvae.nearest_code(x, codebook, backend="triton")


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_ties_go_to_the_lowest_index(backend):
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    idx, _ = pyvae.nearest_code(x, codebook, backend=backend)
    assert idx.tolist() == [0, 1, 0]


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_nan_rows_and_codes(backend):
    codebook = torch.tensor([[float("nan"), 0.0], [1.0, 1.0], [0.0, 0.0]])
    x = torch.tensor([[0.1, 0.1], [float("nan"), 1.0], [0.9, 0.8]])
    idx, dist = pyvae.nearest_code(x, codebook, backend=backend)
    assert idx.tolist() == [2, 0, 1]
    assert dist[1].isnan() and dist[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_vector_quantize_values_and_gradients(backend):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 9, requires_grad=True)
    codebook = torch.randn(13, 9, requires_grad=True)
    r = pyvae.vector_quantize(x, codebook, beta=0.3, backend=backend)
    g = torch.randn_like(r.quantized)
    torch.autograd.backward([r.quantized, r.loss], [g, torch.tensor(1.7)])

    x64 = x.detach().double().requires_grad_()
    e64 = codebook.detach().double().requires_grad_()
    quantized, codebook_loss, commitment, loss = vq_reference(x64, e64, r.indices, 0.3)
    torch.autograd.backward([quantized, loss], [g.double(), torch.tensor(1.7).double()])

    torch.testing.assert_close(r.quantized.double(), quantized.detach())
    torch.testing.assert_close(r.codebook_loss.double(), codebook_loss.detach())
    torch.testing.assert_close(r.commitment_loss.double(), commitment.detach())
    torch.testing.assert_close(r.loss.double(), loss.detach())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codebook.grad.double(), e64.grad, rtol=1e-5, atol=1e-6)
    counts = torch.bincount(r.indices.flatten(), minlength=13)
    assert torch.equal(r.counts, counts) and r.counts.sum() == 30
    p = counts.double() / 30
    expected_perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    torch.testing.assert_close(r.perplexity.double(), expected_perplexity, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_mixed_dtypes_losses_use_the_codes_as_stored(backend):
    # bf16 x, float32 codebook: quantized is in x's dtype, but the losses measure the float32 codes.
    torch.manual_seed(0)
    x = torch.randn(40, 8).bfloat16()
    codebook = torch.randn(11, 8)
    r = pyvae.vector_quantize(x, codebook, backend=backend)
    assert r.quantized.dtype == torch.bfloat16
    expected = ((x.double() - codebook.double()[r.indices]) ** 2).mean()
    torch.testing.assert_close(r.codebook_loss.double(), expected, rtol=1e-5, atol=0)


def test_float64_gradients_match_stop_gradient_autograd():
    """gradcheck cannot see stop-gradients (the straight-through output is numerically e[idx]), so the
    float64 gradients are compared with autograd through the detach()-based definitions instead."""
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    idx, _ = pyvae.nearest_code(x, codebook, backend="torch")
    quantized, codebook_loss, commitment = VQFunction.apply(x, codebook, idx, "torch")
    weights = torch.randn(7, 4, dtype=torch.float64)
    grads = torch.autograd.grad((quantized * weights).sum() + 0.7 * codebook_loss + 0.3 * commitment, [x, codebook])
    x2, e2 = x.detach().requires_grad_(), codebook.detach().requires_grad_()
    q, codebook_loss, commitment, _ = vq_reference(x2, e2, idx, 0.3)
    reference = (q * weights).sum() + 0.7 * codebook_loss + 0.3 * commitment
    for a, b in zip(grads, torch.autograd.grad(reference, [x2, e2])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_codebook_stats(backend):
    x = torch.randn(50, 6)
    idx = torch.randint(0, 9, (50,))
    counts, sums = pyvae.codebook_stats(x, idx, 9, backend=backend)
    torch.testing.assert_close(counts, torch.bincount(idx, minlength=9).float())
    torch.testing.assert_close(sums, torch.zeros(9, 6).index_add_(0, idx, x), rtol=1e-6, atol=1e-6)
    again = pyvae.codebook_stats(x, idx, 9, backend=backend)
    assert torch.equal(again[1], sums)


@pytest.mark.parametrize("backend", VQ_BACKENDS)
@pytest.mark.parametrize("d,dtype", [(3, torch.float32), (200, torch.float32), (16, torch.bfloat16)])
def test_codebook_stats_skewed(backend, d, dtype):
    # One code takes most rows (several 64-row chunks on the GPU kernels), one exactly 64, most none;
    # 3-D and non-contiguous x.
    torch.manual_seed(0)
    idx = torch.cat([torch.full((300,), 7), torch.full((64,), 2), torch.randint(0, 40, (37,))])
    idx = idx[torch.randperm(idx.numel())].reshape(1, -1)
    x = torch.randn(1, idx.shape[1], 2 * d)[..., ::2].to(dtype)
    counts, sums = pyvae.codebook_stats(x, idx, 40, backend=backend)
    expected = torch.zeros(40, d, dtype=torch.float64).index_add_(0, idx.reshape(-1), x.reshape(-1, d).double())
    torch.testing.assert_close(counts, torch.bincount(idx.reshape(-1), minlength=40).float())
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(pyvae.codebook_stats(x, idx, 40, backend=backend)[1], sums)


@pytest.mark.parametrize("backend", [b for b in VQ_BACKENDS if b != "triton"])  # 16M rows: not in the interpreter
def test_codebook_stats_counts_past_2_24(backend):
    # A float32 running count stops at 2**24; counts are exact integers rounded once to float32.
    n = 2**24 + 3
    counts, sums = pyvae.codebook_stats(torch.ones(n, 1), torch.zeros(n, dtype=torch.int64), 2, backend=backend)
    assert counts.tolist() == [2.0**24 + 4, 0.0]  # 2**24 + 3 rounded to float32


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_empty_x(backend):
    x = torch.randn(0, 4, requires_grad=True)
    codebook = torch.randn(3, 4, requires_grad=True)
    r = pyvae.vector_quantize(x, codebook, backend=backend)
    assert r.quantized.shape == (0, 4) and r.indices.shape == (0,)
    assert r.loss.item() == 0 and torch.equal(r.counts, torch.zeros(3, dtype=torch.int64))
    r.loss.backward()
    assert codebook.grad.abs().sum() == 0


BAD = [
    (lambda: pyvae.nearest_code(torch.randn(4, 3), torch.randn(5, 4)), ValueError, "D = 4"),
    (lambda: pyvae.nearest_code(torch.randn(4, 3), torch.randn(5, 3, 1)), ValueError, "codebook must be 2-D"),
    (lambda: pyvae.nearest_code(torch.randn(4, 3), torch.randn(0, 3)), ValueError, "K = 0"),
    (lambda: pyvae.nearest_code(torch.ones(4, 3, dtype=torch.int32), torch.randn(5, 3)), TypeError, "x must be a floating"),
    (lambda: pyvae.nearest_code(torch.randn(4, 3), torch.randn(5, 3), precision="tf32"), ValueError, "precision"),
    (lambda: pyvae.codebook_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, 5]), 5), ValueError, r"\[0, num_codes"),
    (lambda: pyvae.codebook_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]).int(), 5), TypeError, "int64"),
    (lambda: pyvae.codebook_stats(torch.randn(4, 3), torch.tensor([0, 1]), 5), ValueError, "shape"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_native_cpu("vq")
def test_opcheck():
    x, codebook = torch.randn(2, 10, 8), torch.randn(7, 8)
    torch.library.opcheck(torch.ops.pyvae.nearest_code, (x, codebook, True))
    torch.library.opcheck(torch.ops.pyvae.codebook_stats, (x, torch.randint(0, 7, (2, 10)), 7))
    if "triton" in VQ_BACKENDS:  # the interpreter runs kernels on fake tensors: structural checks only
        torch.library.opcheck(torch.ops.pyvae.nearest_code_triton, (x, codebook, True),
                              test_utils=("test_schema", "test_autograd_registration"))
        torch.library.opcheck(torch.ops.pyvae.codebook_stats_triton, (x, torch.randint(0, 7, (2, 10)), 7),
                              test_utils=("test_schema", "test_autograd_registration"))


@needs_native_cpu("vq")
def test_torch_compile_fullgraph_cpu():
    def step(x, codebook):
        r = pyvae.vector_quantize(x, codebook, backend="cpu")
        return r.quantized.square().sum() + r.loss

    x, codebook = torch.randn(16, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    eager = step(x, codebook)
    eager_grads = torch.autograd.grad(eager, [x, codebook])
    compiled = torch.compile(step, fullgraph=True)(x, codebook)
    grads = torch.autograd.grad(compiled, [x, codebook])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def _peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.slow
@needs_native_cpu("vq")
def test_memory_never_n_by_k():
    """N=32768, K=16384, D=64: an N x K float32 matrix would be 2 GiB; peak growth stays < 512 MiB."""
    try:
        _peak_rss_reset()
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    x, codebook = torch.randn(32768, 64), torch.randn(16384, 64)
    before = _peak_rss()
    _peak_rss_reset()
    idx, _ = pyvae.nearest_code(x, codebook, backend="cpu")
    growth = _peak_rss() - before
    assert growth < 512 * 2**20, f"peak memory grew by {growth / 2**20:.0f} MiB"
    assert idx.shape == (32768,)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("n,k,d,dtype", [(4097, 1000, 64, torch.float32), (513, 65, 3, torch.float32),
                                         (1000, 300, 1000, torch.float32), (777, 129, 64, torch.bfloat16),
                                         (300, 70, 37, torch.float16)])
def test_gpu_nearest_code(backend, precision, n, k, d, dtype):
    if backend not in pyvae.backends.available("cuda", "vq"):
        pytest.skip(f"{backend} not available")
    x, codebook = torch.randn(n, d, device="cuda").to(dtype), torch.randn(k, d, device="cuda").to(dtype)
    idx, dist = pyvae.nearest_code(x, codebook, precision=precision, backend=backend)
    if precision == "exact" or dtype != torch.float32:
        # 16-bit inputs: the tensor cores' products of 16-bit values are exact and accumulate in
        # float32, so "fast" meets the exact criterion too
        assert_nearest_codes(x.float().cpu(), codebook.float().cpu(), idx.cpu())
        expected = ((x.double() - codebook.double()[idx]) ** 2).sum(1)
        torch.testing.assert_close(dist.double(), expected, rtol=1e-4, atol=1e-4 * d)
    else:  # TF32: report-level agreement only
        ref, _ = pyvae.nearest_code(x.cpu(), codebook.cpu(), backend="torch")
        assert (idx.cpu() == ref).float().mean() > 0.9
    r = pyvae.vector_quantize(x.float().requires_grad_(), codebook.float().requires_grad_(), backend=backend)
    r.loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_tensors_on_a_device_that_is_not_current(backend):
    # Triton launches on the current device: the launchers must switch to the tensors' device.
    if backend not in pyvae.backends.available("cuda", "vq"):
        pytest.skip(f"{backend} not available")
    x, codebook = torch.randn(300, 37), torch.randn(50, 37)
    expected = pyvae.nearest_code(x, codebook, backend="cpu")[0]
    with torch.cuda.device(0):
        idx, _ = pyvae.nearest_code(x.to("cuda:1"), codebook.to("cuda:1"), backend=backend)
        counts, _ = pyvae.codebook_stats(x.to("cuda:1"), idx, 50, backend=backend)
        loss = pyvae.bernoulli_nll(x.to("cuda:1"), x.sigmoid().to("cuda:1"), backend=backend)
        z, kl = pyvae.reparameterize_kl(x.to("cuda:1"), x.to("cuda:1"), seed=1, backend=backend)
    assert torch.equal(idx.cpu(), expected) and counts.sum().item() == 300
    torch.testing.assert_close(loss.cpu(), pyvae.bernoulli_nll(x, x.sigmoid(), backend="cpu"))
    torch.testing.assert_close(kl.cpu(), pyvae.reparameterize_kl(x, x, seed=1, backend="cpu")[1])


@pytest.mark.gpu
def test_gpu_ties_and_nan():
    for backend in [b for b in ("cuda", "triton") if b in pyvae.backends.available("cuda", "vq")]:
        codebook = torch.tensor([[float("nan"), 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], device="cuda")
        x = torch.tensor([[0.1, 0.1], [float("nan"), 1.0], [0.9, 0.8]], device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            for precision in ("exact", "fast"):
                idx, dist = pyvae.nearest_code(x.to(dtype), codebook.to(dtype), precision=precision, backend=backend)
                assert idx.tolist() == [2, 0, 1] and dist[1].isnan(), (dtype, precision)


@pytest.mark.parametrize("pair", no_sync_pairs("vq"), ids=pair_id)
def test_vector_quantize_no_host_sync(pair, gen):
    """Search, losses and both gradients without a host synchronisation; then what they computed:
    nearest codes, and values and gradients against float64 autograd on the same codes."""
    skip_unless_available(pair, "vq")
    device, backend = pair
    x = randn(512, 32, gen=gen, device=device).requires_grad_()
    codebook = randn(64, 32, gen=gen, device=device).requires_grad_()
    # upstream gradients: the loss's weighted by numel, so that its gradients are as large as quantized's
    upstream = [randn(512, 32, gen=gen, device=device), torch.tensor(float(x.numel()), device=device)]
    pyvae.vector_quantize(x, codebook, backend=backend)  # compile outside the check
    with no_host_sync(device):
        r = pyvae.vector_quantize(x, codebook, backend=backend)
        grads = torch.autograd.grad([r.quantized, r.loss], [x, codebook], upstream)
    assert_nearest_codes(x, codebook, r.indices)
    x64, e64 = (t.detach().double().cpu().requires_grad_() for t in (x, codebook))
    expected = vq_reference(x64, e64, r.indices.cpu(), 0.25)
    for got, want in zip((r.quantized, r.codebook_loss, r.commitment_loss, r.loss), expected):
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad([expected[0], expected[3]], [x64, e64], [u.double().cpu() for u in upstream])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_codebook_gradient_deterministic(backend):
    if backend not in pyvae.backends.available("cuda", "vq"):
        pytest.skip(f"{backend} not available")
    x = torch.randn(20000, 16, device="cuda")
    codebook = torch.randn(8, 16, device="cuda", requires_grad=True)  # few codes: long segments
    grads = []
    for _ in range(3):
        r = pyvae.vector_quantize(x, codebook, backend=backend)
        grads.append(torch.autograd.grad(r.loss, codebook)[0])
    assert all(torch.equal(g, grads[0]) for g in grads)
    counts, sums = pyvae.codebook_stats(x, r.indices, 8, backend=backend)
    torch.testing.assert_close(sums.cpu(), torch.zeros(8, 16).index_add_(0, r.indices.cpu(), x.cpu()),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_autocast(backend):
    # An encoder under autocast hands bf16 rows to a float32 codebook.
    encoder = torch.nn.Linear(12, 8)
    codebook = torch.randn(20, 8, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        x = encoder(torch.randn(30, 12))
        res = pyvae.vector_quantize(x, codebook, backend=backend)
    assert x.dtype == torch.bfloat16 and res.quantized.dtype == torch.bfloat16
    assert_nearest_codes(x.detach().float(), codebook.detach(), res.indices)
    (res.quantized.float().sum() + res.loss).backward()
    assert encoder.weight.grad.isfinite().all() and codebook.grad.isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("d,dtype", [(3, torch.float32), (300, torch.float32), (64, torch.bfloat16)])
def test_gpu_codebook_stats(backend, d, dtype):
    if backend not in pyvae.backends.available("cuda", "vq"):
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    idx = torch.cat([torch.full((5000,), 7), torch.full((64,), 2), torch.randint(0, 300, (3001,))])
    idx = idx[torch.randperm(idx.numel())].cuda()
    x = torch.randn(idx.numel(), 2 * d, device="cuda")[:, ::2].to(dtype)
    counts, sums = pyvae.codebook_stats(x, idx, 300, backend=backend)
    expected = torch.zeros(300, d, dtype=torch.float64, device="cuda").index_add_(0, idx, x.double())
    torch.testing.assert_close(counts, torch.bincount(idx, minlength=300).float())
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(pyvae.codebook_stats(x, idx, 300, backend=backend)[1], sums)


# ----------------------------------------------------------------------------- higher order, torch.func, compile
def _quantize(backend, x, codebook):
    r = pyvae.vector_quantize(x, codebook, beta=0.3, backend=backend)
    return r.quantized, r.loss, r.commitment_loss, r.codebook_loss


def _distinct_inputs(gen, rows=(6,)):
    """x and a codebook whose nearest codes are clear (no near-ties that float32 and float64 could
    resolve differently)."""
    codebook = 3.0 * torch.randn(5, 4, generator=gen)
    x = codebook[torch.randint(0, 5, rows, generator=gen)] + 0.1 * torch.randn(*rows, 4, generator=gen)
    return [x, codebook]


def test_gradgradcheck_float64_reference(gen):
    inputs = [t.double().requires_grad_() for t in _distinct_inputs(gen)]
    assert torch.autograd.gradgradcheck(lambda *xs: _quantize("torch", *xs), inputs)


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_second_order_gradients_match_reference(backend, gen):
    # the cpu backend's codebook statistics had no derivative: its second-order gradient differed
    transforms.assert_second_order_matches_reference(_quantize, backend, _distinct_inputs(gen))


@pytest.mark.parametrize("backend", VQ_BACKENDS)
def test_torch_func_transforms_match_loop(backend, gen):
    x, codebook = _distinct_inputs(gen, rows=(3, 6))
    transforms.assert_func_transforms_match_loop(lambda b, xs: _quantize(b, xs, codebook), backend, [x])
    codebooks = codebook + 0.01 * torch.randn(3, 5, 4, generator=gen)  # a codebook per vmapped slice
    transforms.assert_func_transforms_match_loop(_quantize, backend, [x, codebooks])


@pytest.mark.parametrize("pair", compile_pairs("vq"), ids=pair_id)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_in_bounded_time_without_recompiles(pair, dynamic):
    device, backend = pair

    def make(size):
        return [t.to(device) for t in _distinct_inputs(torch.Generator().manual_seed(size), (6 + size,))]

    transforms.assert_compiles_once(lambda b, x, c: _quantize(b, x, c)[1:], backend, make, dynamic)


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


# ------------------------------------------------------------------------------ constants shared with C++
def _chunk_sensitive_rows(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [2 chunk + 5, 1] and indices: code 0's rows sum to 2^23 + 1 in chunks of ``chunk`` rows
    added in order (2^23, then 0.5 + 0.5), to 2^23 in chunks of chunk / 2 (2^23 + 0.5 rounds to
    even, twice) and to 2^23 added row by row; code 1 takes the 5 rows between."""
    x = torch.zeros(2 * chunk + 5, 1)
    idx = torch.zeros(2 * chunk + 5, dtype=torch.int64)
    idx[3:8] = 1
    code0_rows = torch.nonzero(idx == 0).flatten()
    x[code0_rows[0]] = 2.0 ** 23
    x[code0_rows[chunk]] = x[code0_rows[2 * chunk - 1]] = 0.5
    x[3:8] = torch.arange(5.0)[:, None]
    return x, idx


def test_stats_chunk_rows_is_the_same_on_both_gpu_backends():
    """The GPU codebook_stats sum each code's rows in chunks of STATS_CHUNK_ROWS and add the chunk
    sums in order; on these rows that gives 2^23 + 1 where another chunk size (or the cpu backend's
    row-by-row sum) gives 2^23. The CUDA backend's Python part (the preparation, then the C++ op
    codebook_chunk_sums) runs here with the Triton chunk kernels standing in for the C++ ones."""
    if "triton" not in pyvae.backends.available("cpu", "vq"):
        pytest.skip("needs the triton backend on CPU tensors")
    from pyvae._constants import STATS_CHUNK_ROWS
    from pyvae.kernels import vq as triton_vq
    from pyvae.ops.vq import _codebook_stats_cuda

    x, idx = _chunk_sensitive_rows(STATS_CHUNK_ROWS)
    expected_counts = torch.tensor([2 * STATS_CHUNK_ROWS, 5.0, 0.0])
    expected_sums = torch.tensor([[2.0 ** 23 + 1.0], [10.0], [0.0]])
    results = {"triton": torch.ops.pyvae.codebook_stats_triton(x, idx, 3)}
    if pyvae.backends.native_extension() is not None:
        with torch.library._scoped_library("pyvae", "IMPL") as lib:
            lib.impl("codebook_chunk_sums", lambda x2, *plan: triton_vq._chunk_sums(x2, triton_vq.StatsPlan(*plan)),
                     "CPU")
            results["cuda (its Python part)"] = _codebook_stats_cuda(x, idx, 3)
    for name, (counts, sums) in results.items():
        assert torch.equal(counts, expected_counts), name
        assert torch.equal(sums, expected_sums), name
