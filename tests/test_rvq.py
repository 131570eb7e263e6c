"""Residual vector quantisation: pyvae.residual_quantize (the fused op family ``rvq``) against a
chain of single-stage calls, its memory, its derivatives under autograd, torch.func and
torch.compile, and the layer (pyvae.nn.ResidualVectorQuantizer) and the VQ-VAE built on it. Every
backend's search is checked against the float64 contract in tests/families/rvq.py (property cases)."""
import pytest
import torch

import pyvae
from families.rvq import check_residual_search, float32_residuals
from pyvae.nn import ResidualVectorQuantizer, VectorQuantizer

BACKENDS = pyvae.backends.available("cpu", "rvq")


def _data(n=300, d=16, q=3, k=32, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    scale = 0.6 ** torch.arange(q, dtype=torch.float32)[:, None, None]
    return x, (torch.randn(q, k, d, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_search_equals_the_chain_of_single_stage_searches(backend):
    """The fused call finds, stage by stage, what nearest_code finds on each residual (the residual
    computed in float32 as the chain would), and passes the contract's check."""
    x, codebooks = _data(n=257, d=33, q=4, k=65)
    idx, dist, quantized = pyvae.backends.plain_op("rvq", "residual_code", backend)(x, codebooks, True)
    check_residual_search(x, codebooks, idx, dist, quantized)
    r = x.clone()
    for q in range(codebooks.shape[0]):
        chain_idx, chain_dist = pyvae.nearest_code(r, codebooks[q], backend="torch")
        assert torch.equal(idx[:, q], chain_idx), f"stage {q}"
        r = r - codebooks[q][chain_idx]
        torch.testing.assert_close(dist[:, q], (r * r).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distinct", [16, 5])
def test_ties_go_to_the_lowest_index(backend, distinct):
    """Each codebook repeats its first ``distinct`` codes (at strides that put the copies in the same
    and in different lanes / tiles of the searches): every row's winner is the first copy."""
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(3, distinct, 6, generator=gen)
    codebooks = base.repeat(1, 70 // distinct + 1, 1)[:, :70]
    x = torch.randn(150, 6, generator=gen)
    idx, dist, quantized = pyvae.backends.plain_op("rvq", "residual_code", backend)(x, codebooks, True)
    assert (idx < distinct).all(), idx.max()
    check_residual_search(x, codebooks, idx, dist, quantized)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_match_a_chain_of_vector_quantize_calls(backend):
    x, codebooks = _data()
    res = pyvae.residual_quantize(x, codebooks, beta=0.5, backend=backend)
    r, losses = x, []
    for q in range(codebooks.shape[0]):
        stage = pyvae.vector_quantize(r, codebooks[q], beta=0.5, backend="torch")
        assert torch.equal(stage.indices, res.indices[:, q])
        assert torch.equal(stage.counts, res.counts[q])
        losses.append(stage.commitment_loss)
        r = r - stage.quantized
    torch.testing.assert_close(res.commitment_losses, torch.stack(losses), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.loss, 1.5 * torch.stack(losses).sum(), rtol=1e-5, atol=1e-7)


def test_backends_agree_on_values_and_gradients():
    x, codebooks = _data(n=200, d=12, q=3, k=20, seed=3)
    results = {}
    for backend in BACKENDS:
        xg, cg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
        res = pyvae.residual_quantize(xg, cg, backend=backend)
        (res.loss + (res.quantized * torch.linspace(-1, 1, 12)).sum()).backward()
        results[backend] = (res.indices, res.quantized.detach(), res.loss.detach(), xg.grad, cg.grad)
    first = results[BACKENDS[0]]
    for backend, got in results.items():
        assert torch.equal(got[0], first[0]), backend
        for a, b in zip(got[1:], first[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=backend)


def test_no_residual_history_in_memory():
    """Autograd keeps x, the codebooks and the indices, nothing of size [N, Q, D]; the forward's
    peak allocation stays well below one residual per stage, and so does the backward's."""
    n, d, q, k = 8192, 64, 8, 256
    x, codebooks = _data(n=n, d=d, q=q, k=k)
    x.requires_grad_()
    codebooks.requires_grad_()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = pyvae.residual_quantize(x, codebooks, backend="cpu")
    assert sum(saved.values()) == x.numel() * 4 + codebooks.numel() * 4 + n * q * 8
    history = n * q * d * 4
    from torch.profiler import ProfilerActivity, profile

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = top = 0
        for _, nbytes in sorted((ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events()
                                if ev.name() == "[memory]"):
            live += nbytes
            top = max(top, live)
        return top

    forward_peak = peak(lambda: pyvae.residual_quantize(x.detach(), codebooks.detach(), backend="cpu"))
    assert forward_peak < history / 2, (forward_peak, history)
    backward_peak = peak(lambda: (res.quantized.sum() + res.loss).backward())
    assert backward_peak < history / 2, (backward_peak, history)


def test_gradcheck_and_second_order_on_the_reference():
    """The Function's backward is differentiable: gradcheck and gradgradcheck of the losses in float64
    (codes far apart, so no argmin changes under the perturbations)."""
    gen = torch.Generator().manual_seed(1)
    codebooks = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) * torch.tensor([4.0, 1.0])[:, None, None]
    x = (codebooks[0][torch.tensor([0, 3, 1, 4])] + 0.1 * torch.randn(4, 3, generator=gen, dtype=torch.float64))
    x.requires_grad_()
    codebooks.requires_grad_()

    first = codebooks[:1].detach()

    # Where the losses' values depend on an input through a stop-gradient (the earlier stages' codes
    # in a residual; x in the codebook losses), their gradient is by definition not the derivative:
    # checked are the commitment losses against x, and the codebook losses against the last stage.
    def commitment(x):
        return pyvae.residual_quantize(x, codebooks.detach(), beta=0.3, backend="torch").commitment_losses

    def codebook(last):
        return pyvae.residual_quantize(x.detach(), torch.cat([first, last]), backend="torch").codebook_losses

    last = codebooks[1:].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(commitment, (x,))
    assert torch.autograd.gradgradcheck(commitment, (x,))
    assert torch.autograd.gradcheck(codebook, (last,))
    assert torch.autograd.gradgradcheck(codebook, (last,))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_second_order_of_the_native_backends_equals_the_reference(backend):
    x, codebooks = _data(n=40, d=6, q=2, k=8, seed=2)
    grads = {}
    for b in ("torch", backend):
        xg, cg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
        res = pyvae.residual_quantize(xg, cg, backend=b)
        gx, gc = torch.autograd.grad(res.loss, (xg, cg), create_graph=True)
        (gx.square().sum() + gc.square().sum()).backward()
        grads[b] = (gx.detach(), gc.detach(), xg.grad, cg.grad)
    for a, b in zip(grads["torch"], grads[backend]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_torch_func_grad_and_vmap():
    x, codebooks = _data(n=30, d=5, q=2, k=7, seed=4)
    backend = "cpu" if "cpu" in BACKENDS else "torch"

    def loss(x, codebooks):
        return pyvae.residual_quantize(x, codebooks, backend=backend).loss

    gx, gc = torch.func.grad(loss, argnums=(0, 1))(x, codebooks)
    xg, cg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
    loss(xg, cg).backward()
    torch.testing.assert_close(gx, xg.grad)
    torch.testing.assert_close(gc, cg.grad)
    batched = torch.func.vmap(lambda xb: pyvae.residual_quantize(xb, codebooks, backend=backend).indices)(
        x.reshape(3, 10, 5))
    assert torch.equal(batched.reshape(30, 2), pyvae.residual_quantize(x, codebooks, backend=backend).indices)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "torch")])
def test_torch_compile_fullgraph(backend):
    x, codebooks = _data(n=64, d=8, q=3, k=16, seed=5)

    def step(x, codebooks):
        res = pyvae.residual_quantize(x, codebooks, backend=backend)
        return res.quantized * 2, res.loss, res.indices

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        xg, cg = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
        q, loss, idx = fn(xg, cg)
        (q.sum() + loss).backward()
        outs[name] = (q.detach(), loss.detach(), idx, xg.grad, cg.grad)
    for a, b in zip(outs["eager"], outs["compiled"]):
        torch.testing.assert_close(a, b)


def test_autocast_keeps_the_search_in_float32():
    x, codebooks = _data(n=100, d=16, q=3, k=32, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = pyvae.residual_quantize(x, codebooks, backend="cpu" if "cpu" in BACKENDS else "torch")
    plain = pyvae.residual_quantize(x, codebooks, backend="torch")
    assert res.quantized.dtype == torch.float32 and torch.equal(res.indices, plain.indices)


def test_16_bit_inputs_and_a_shared_codebook():
    x, codebooks = _data(n=120, d=10, q=1, k=24, seed=7, dtype=torch.bfloat16)
    shared = codebooks.expand(4, -1, -1)
    for backend in BACKENDS:
        idx, dist, quantized = pyvae.backends.plain_op("rvq", "residual_code", backend)(x, shared, True)
        check_residual_search(x, shared, idx, dist, quantized)


@pytest.mark.parametrize("make, error, words", [
    (lambda: (torch.randn(4, 3), torch.randn(2, 5, 4)), ValueError, "x must be [..., D] with D = 4 (the codebooks')"),
    (lambda: (torch.randn(4, 3), torch.randn(5, 3)), ValueError, "codebooks must be 3-D [Q, K, D]"),
    (lambda: (torch.randn(4, 3), torch.randn(0, 5, 3)), ValueError, "at least one stage (Q = 0)"),
    (lambda: (torch.randn(4, 3), torch.randn(2, 0, 3)), ValueError, "at least one code (K = 0)"),
    (lambda: (torch.zeros(4, 3, dtype=torch.int64), torch.randn(2, 5, 3)), TypeError, "x must be a floating"),
    (lambda: ([[1.0, 2.0]], torch.randn(2, 5, 2)), TypeError, "x must be a"),
])
def test_bad_input_is_refused_before_any_kernel(make, error, words):
    x, codebooks = make()
    with pytest.raises(error) as info:
        pyvae.residual_quantize(x, codebooks)
    assert words in str(info.value)


def test_bad_precision_is_refused():
    x, codebooks = _data()
    with pytest.raises(ValueError, match="precision must be 'exact' or 'fast'"):
        pyvae.residual_quantize(x, codebooks, precision="tf32")


# ------------------------------------------------------------------------------ the layer
def test_layer_ema_step_is_each_stages_ema_on_its_residuals():
    torch.manual_seed(0)
    layer = ResidualVectorQuantizer(16, 8, 3, ema_decay=0.9)
    reference = [VectorQuantizer(16, 8, ema_decay=0.9) for _ in range(3)]
    for stage, ref in zip(layer.stages, reference):
        ref.load_state_dict(stage.state_dict())
    x = torch.randn(200, 8)
    before = layer.codebooks.clone()
    res = layer(x)
    residuals = float32_residuals(x, before, res.indices)
    for q, ref in enumerate(reference):
        out = ref(residuals[q])
        assert torch.equal(out.indices, res.indices[:, q])
        for name in ("codebook", "ema_counts", "ema_sums"):
            torch.testing.assert_close(getattr(layer.stages[q], name), getattr(ref, name), msg=f"stage {q} {name}")
        torch.testing.assert_close(layer.stages[q].usage, ref.usage)
    torch.testing.assert_close(res.loss, 0.25 * res.commitment_losses.sum())


def test_layer_learned_codebooks_get_gradients_and_shared_codebook_sums_them():
    torch.manual_seed(1)
    layer = ResidualVectorQuantizer(16, 8, 3)
    x = torch.randn(100, 8, requires_grad=True)
    res = layer(x)
    res.loss.backward()
    assert all(s.codebook.grad is not None and s.codebook.grad.abs().sum() > 0 for s in layer.stages)
    shared = ResidualVectorQuantizer(16, 8, 3, shared_codebook=True)
    assert len(shared.stages) == 1 and shared.codebooks.shape == (3, 16, 8)
    res = shared(x)
    res.loss.backward()
    assert shared.stages[0].codebook.grad.abs().sum() > 0
    shared_ema = ResidualVectorQuantizer(16, 8, 3, shared_codebook=True, ema_decay=0.5)
    counts_before = shared_ema.stages[0].ema_counts.clone()
    shared_ema(x.detach())
    # one EMA step from every stage's rows: the counts' total moves towards 3 * 100
    torch.testing.assert_close(shared_ema.stages[0].ema_counts.sum(), 0.5 * counts_before.sum() + 0.5 * 300)


def test_layer_kmeans_initialises_every_stage_on_its_residuals():
    torch.manual_seed(2)
    layer = ResidualVectorQuantizer(8, 4, 2, ema_decay=0.99, kmeans_init=True)
    x = torch.randn(500, 4) * 3
    res = layer(x)
    assert all(s._initted for s in layer.stages)
    # after k-means the second stage's codes are the scale of the first stage's residuals, not of x
    assert layer.stages[1].codebook.norm(dim=1).mean() < 0.8 * layer.stages[0].codebook.norm(dim=1).mean()
    assert res.indices.shape == (500, 2)


def test_layer_decodes_its_indices_and_round_trips_its_state():
    torch.manual_seed(3)
    layer = ResidualVectorQuantizer(16, 8, 4, ema_decay=0.9).eval()
    x = torch.randn(2, 5, 8)
    res = layer(x)
    torch.testing.assert_close(layer.get_output_from_indices(res.indices), res.quantized.detach())
    assert layer.get_codes_from_indices(res.indices).shape == (4, 2, 5, 8)
    other = ResidualVectorQuantizer(16, 8, 4, ema_decay=0.9).eval()
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x).indices, res.indices)


# ------------------------------------------------------------------------------ the model
def test_vqvae_with_residual_quantizer():
    torch.manual_seed(4)
    model = pyvae.models.VQVAE((1, 8, 8), num_codes=16, code_dim=4, channels=(8,), downsample=1, num_quantizers=3)
    x = torch.rand(6, 1, 8, 8).round()
    out = model(x)
    out.loss.backward()
    assert out.indices.shape == (6, 4, 4, 3)
    idx = model.encode_indices(x)
    assert idx.shape == (6, 4, 4, 3)
    torch.testing.assert_close(model.decode_indices(idx), model.decode(model.encode(x)))
    assert model.sample(2).shape == (2, 1, 8, 8)
    metrics = model.evaluation_metrics(x, x_train=x)
    assert metrics["num_quantizers"] == 3
    for key in ("code_usage", "codes_used", "perplexity", "code_counts", "train_code_usage", "train_perplexity"):
        assert isinstance(metrics[key], list) and len(metrics[key]) == 3, key
    assert model.fixed_kl == pytest.approx(16 * 3 * torch.log(torch.tensor(16.0)).item())
    assert model.anomaly_score(x).shape == (6,)


def test_vqvae_residual_options_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="num_quantizers applies to quantizer='vq' only"):
        pyvae.models.VQVAE((1, 8, 8), quantizer="fsq", num_quantizers=2)
    with pytest.raises(ValueError, match="cosine: not available with num_quantizers > 1"):
        pyvae.models.VQVAE((1, 8, 8), num_quantizers=2, cosine=True)


def test_cli_num_quantizers_option():
    from pyvae.train.errors import UsageError
    from pyvae.train.options import parse_args

    assert parse_args(["--model", "vqvae", "--num-quantizers", "4"]).num_quantizers == 4
    with pytest.raises(UsageError, match="--num-quantizers: not options of --quantizer fsq"):
        parse_args(["--model", "vqvae", "--quantizer", "fsq", "--num-quantizers", "2"])
    with pytest.raises(UsageError, match="--num-quantizers does not apply to --model vae"):
        parse_args(["--model", "vae", "--num-quantizers", "2"])
