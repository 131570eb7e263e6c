"""pyvae.models.HierarchicalVAE: its objective, per-layer KLs against the learned priors and their
gradients against the same network written out here in float64 with torch.distributions; free bits
per layer; sample / encode / decode against ancestral references; iwae_nll; save/load;
torch.compile; bad input."""
import copy
import io
import math

import pytest
import torch
import torch.distributions as D

from pyvae import metrics
from pyvae.models import BaseVAE, HierarchicalVAE, ModelOutput
from pyvae.ops.reparam_kl import reference_eps

from cases import needs_native_cpu

DIMS = (4, 3, 2)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"latent_dims": DIMS, "hidden_dims": (16,), **kw}
    model = HierarchicalVAE((12,), **kw)
    with torch.no_grad():  # priors and posteriors away from N(0, I), so that a KL against the wrong one shows
        for layer in [*model.priors, *(latent.proj for latent in model.latents)]:
            layer.weight.mul_(3.0)
            layer.bias.normal_(0.0, 0.5)
    return model


def data(b=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 12, generator=g, dtype=torch.float64).to(dtype)


def ladder(m, x, draw):
    """The hierarchy written out with the model's modules ``m`` (float64): bottom-up features, then
    from the top, each layer's prior p (N(0, 1) at the top), posterior q and ``z = draw(i, q, p)``.
    Returns (decoder logits, zs, qs, ps), lists bottom first."""
    x = x.double()
    d = [m.encoder(x.flatten(1))]
    for block in m.bottom_up:
        d.append(block(d[-1]))
    n = len(m.latent_dims)
    zs, qs, ps = [None] * n, [None] * n, [None] * n
    s = None
    for i in reversed(range(n)):
        if s is None:
            ps[i], h = D.Normal(0.0, 1.0), d[i]
        else:
            prior_mu, prior_logvar = m.priors[i](s).chunk(2, dim=-1)
            ps[i], h = D.Normal(prior_mu, torch.exp(0.5 * prior_logvar)), torch.cat([d[i], s], dim=-1)
        mu, logvar = m.latents[i].proj(h).chunk(2, dim=-1)
        qs[i] = D.Normal(mu, torch.exp(0.5 * logvar))
        zs[i] = draw(i, qs[i], ps[i])
        if i:
            s = m.top_down[i - 1](zs[i] if s is None else torch.cat([zs[i], s], dim=-1))
    logits = m.decoder(torch.cat([zs[0], s], dim=-1))
    return logits, zs, qs, ps


def recon_nll(logits, x):
    return -D.Bernoulli(logits=logits, validate_args=False).log_prob(x.double()).flatten(1).sum(1)


def kl_elements(qs, ps):
    return [D.kl_divergence(q, p) for q, p in zip(qs, ps)]


def seeded(seed, rows):
    """draw() with the model's noise: layer i's eps from seed + i."""
    return lambda i, q, p: q.loc + q.scale * reference_eps(seed + i, (rows, q.loc.shape[-1]), 1, torch.float64)[0]


def at_mean(i, q, p):
    return q.loc


def replay(z_model):
    """draw() that takes the model's own draws (z [N, sum(DIMS)] as forward returns it): z written
    as mu + std * eps with eps recovered, so that it depends on the parameters as the model's does."""
    parts = z_model.double().split(DIMS, dim=1)
    return lambda i, q, p: q.loc + q.scale * ((parts[i] - q.loc) / q.scale).detach()


# ----------------------------------------------------------------------------- the objective
def test_forward_against_float64_reference_and_gradients_reach_the_priors():
    model = make(beta=0.7)
    x = data()
    out = model(x)
    assert isinstance(out, ModelOutput) and isinstance(model, BaseVAE)
    assert out.loss.shape == () and out.recon_loss.shape == (6,) and out.kl.shape == (6,)
    assert out.kl_layers.shape == (3, 6) and out.kl_layers.dtype == torch.float32
    assert out.z.shape == (6, sum(DIMS)) and out.recon.shape == x.shape and not out.recon.requires_grad
    ref = copy.deepcopy(model).double()
    logits, zs, qs, ps = ladder(ref, x, replay(out.z))
    torch.testing.assert_close(torch.cat(zs, 1), out.z.double(), atol=1e-6, rtol=1e-6)
    kl = torch.stack([k.sum(1) for k in kl_elements(qs, ps)])
    nll = recon_nll(logits, x)
    torch.testing.assert_close(out.kl_layers.double(), kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.kl.double(), kl.sum(0).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon_loss.double(), nll.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.recon.double(), torch.sigmoid(logits).detach(), atol=1e-6, rtol=1e-5)
    expected = (nll + 0.7 * kl.sum(0)).mean()
    torch.testing.assert_close(out.loss.double(), expected.detach(), atol=1e-4, rtol=1e-5)
    # gradients, the priors' and top-down networks' among them, through the fused op's prior gradients
    out.loss.backward()
    expected.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=2e-4, rtol=1e-4, msg=name)
    assert all(not torch.allclose(z.detach(), q.loc.detach()) for z, q in zip(zs, qs))  # z is a draw, not the mean


def test_eval_forward_passes_posterior_means_down():
    model = make().eval()
    x = data()
    out = model(x)
    logits, zs, qs, ps = ladder(copy.deepcopy(model).double(), x, at_mean)
    with torch.no_grad():
        torch.testing.assert_close(out.z.double(), torch.cat(zs, 1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.kl_layers.double(), torch.stack([k.sum(1) for k in kl_elements(qs, ps)]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.recon_loss.double(), recon_nll(logits, x), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model.encode(x), out.z)
    torch.testing.assert_close(model.reconstruct(x), out.recon)
    assert model.step.item() == 0


@pytest.mark.parametrize("training", [True, False])
def test_negative_elbo_against_reference(training):
    model = make(beta=5.0, free_bits=2.0).train(training)  # neither enters the negative ELBO
    x = data()
    recon, kl_layers = model.elbo_terms(x, seed=11)
    got = model.negative_elbo(x, seed=11)
    assert model.training == training and kl_layers.shape == (3, 6)
    with torch.no_grad():
        logits, zs, qs, ps = ladder(copy.deepcopy(model).double(), x, seeded(11, 6))
        kl = torch.stack([k.sum(1) for k in kl_elements(qs, ps)])
        nll = recon_nll(logits, x)
    torch.testing.assert_close(kl_layers.double(), kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon.double(), nll, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.double(), nll + kl.sum(0), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(model.anomaly_score(x, seed=11), got)
    assert not torch.equal(model.negative_elbo(x, seed=12), got)


def test_free_bits_per_layer():
    floors = (0.5, 1.0, 0.3)
    model = make(free_bits=floors)
    assert model.free_bits == floors and [latent.free_bits for latent in model.latents] == list(floors)
    assert make(free_bits=0.25).free_bits == (0.25,) * 3
    x = data(b=16)
    out = model(x)
    ref = copy.deepcopy(model).double()
    logits, zs, qs, ps = ladder(ref, x, replay(out.z))
    per_dim = [k.mean(0) for k in kl_elements(qs, ps)]
    below = [(v < f) for v, f in zip(per_dim, floors)]
    assert all(b.any() and (~b).any() for b in below)  # in every layer, dims on both sides of its floor
    floored = sum(torch.clamp(v, min=f).sum() for v, f in zip(per_dim, floors))
    torch.testing.assert_close(out.loss.double(), (recon_nll(logits, x).mean() + floored).detach(),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.kl_layers.double(), torch.stack([k.sum(1) for k in kl_elements(qs, ps)]).detach(),
                               atol=1e-5, rtol=1e-5)  # kl stays the true KL
    # the KL term's gradient (reference: the floored sum) reaches no parameter through a dim under its floor
    model.zero_grad()
    (out.loss - out.recon_loss.mean()).backward()
    floored.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=2e-4, rtol=1e-4, msg=name)
    # a bottom-layer dim under its floor: no KL gradient to its posterior mean (above the bottom, z_i
    # also reaches the KLs below it through the top-down path)
    grad_mu = model.latents[0].proj.weight.grad[:DIMS[0]]
    assert torch.all(grad_mu[below[0]] == 0) and torch.all(grad_mu[~below[0]].abs().sum(1) > 0)
    model.eval()  # no floor in eval mode
    out = model(x)
    torch.testing.assert_close(out.loss, (out.recon_loss + out.kl).mean())


def test_kl_warmup_ramps_beta():
    model = make(beta=2.0, kl_warmup_steps=4)
    x = data()
    for expected in (0.0, 0.5, 1.0, 1.5, 2.0, 2.0):
        assert model.current_beta().item() == pytest.approx(expected)
        out = model(x)
        torch.testing.assert_close(out.loss, (out.recon_loss + expected * out.kl).mean())
    assert model.step.item() == 6


# ----------------------------------------------------------------------------- methods
def test_encode_decode_sample_against_references():
    model = make().eval()
    x = data()
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        logits, zs, _, _ = ladder(ref, x, at_mean)
        z = model.encode(x)
        assert z.shape == (6, 9)
        torch.testing.assert_close(z.double(), torch.cat(zs, 1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.decode(z).double(), torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
        # decode recomputes the top-down states from the upper layers of any z it is given
        other = torch.randn(5, 9)
        parts = other.double().split(DIMS, dim=1)
        logits, _, _, _ = ladder(ref, torch.zeros(5, 12), lambda i, q, p: parts[i])
        torch.testing.assert_close(model.decode(other).double(), torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
        # decode_top: the lower layers at their prior means
        top = torch.randn(5, 2)
        logits, _, _, _ = ladder(ref, torch.zeros(5, 12), lambda i, q, p: top.double() if i == 2 else p.loc)
        torch.testing.assert_close(model.decode_top(top).double(), torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
        # sample: ancestral, the noise of layer i from the i-th seed the generator gives
        seeds = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(4)).tolist()
        logits, _, _, _ = ladder(ref, torch.zeros(7, 12), lambda i, q, p: p.loc + p.scale * reference_eps(
            seeds[i], (7, DIMS[i]), 1, torch.float64)[0])
        got = model.sample(7, generator=torch.Generator().manual_seed(4))
        assert got.shape == (7, 12)
        torch.testing.assert_close(got.double(), torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
    assert not torch.equal(got, model.sample(7, generator=torch.Generator().manual_seed(5)))
    for method in ("linear", "slerp"):
        path = model.interpolate(x[0], x[1], steps=5, method=method)
        assert path.shape == (5, 12)
        torch.testing.assert_close(path[[0, -1]], model.reconstruct(x[:2]), atol=1e-5, rtol=1e-5)
    assert metrics.active_units(model, data(b=50)) <= 9


def test_inference_methods_leave_the_generator_alone():
    model = make()
    x = data()
    state = torch.get_rng_state()
    model.encode(x)
    model.reconstruct(x)
    model.negative_elbo(x)
    model.anomaly_score(x)
    model.log_importance_weights(x, 3, seed=1)
    model.sample(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model.step.item() == 0


# ----------------------------------------------------------------------------- iwae_nll
def iwae_reference(model, x, k, seed):
    """-log (1/k sum_i p(x, z_i) / q(z_i | x)) in float64 over k ancestral draws per example, the
    batch repeated k times and every layer's noise from seed + layer, as the model draws it."""
    b = x.shape[0]
    with torch.no_grad():
        x_k = x.double().repeat(k, 1)
        logits, zs, qs, ps = ladder(copy.deepcopy(model).double(), x_k, seeded(seed, k * b))
        log_w = -recon_nll(logits, x_k)
        for z, q, p in zip(zs, qs, ps):
            log_w = log_w + (p.log_prob(z) - q.log_prob(z)).sum(-1)
    return math.log(k) - torch.logsumexp(log_w.view(k, b), dim=0)


def test_iwae_matches_float64_reference():
    model = make()
    x = data(b=5)
    got = metrics.iwae_nll(model, x, k=7, seed=3)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), iwae_reference(model, x, 7, 3), atol=1e-4, rtol=1e-5)
    exact = make(backend="torch").double()  # the reference backend in float64: agreement to rounding
    got = metrics.iwae_nll(exact, x.double(), k=7, seed=3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, iwae_reference(exact, x, 7, 3), atol=1e-10, rtol=1e-10)
    assert model.log_importance_weights(x, 4, seed=0).shape == (4, 5)


def test_iwae_k1_is_the_negative_elbo_in_expectation_and_tightens_with_k():
    model = make()
    x = data(b=8).repeat(300, 1)  # every row its own draw
    diff = (metrics.iwae_nll(model, x, k=1, seed=7) - model.negative_elbo(x, seed=8)).double()
    se = diff.std() / math.sqrt(diff.numel())
    assert diff.std() > 0.05  # log q - log p per draw against the analytic KLs ...
    assert abs(diff.mean()) < 4 * se  # ... agree in expectation
    bounds = {k: metrics.iwae_nll(model, x[:512], k=k, seed=11).double() for k in (1, 4, 32)}
    for small, large in ((1, 4), (4, 32)):
        gap = bounds[small] - bounds[large]
        assert gap.mean() > 4 * gap.std() / math.sqrt(gap.numel()), (small, large, gap.mean())


# ----------------------------------------------------------------------------- save / load, compile
def test_state_dict_round_trip():
    model = make(likelihood="gaussian", free_bits=(0.1, 0.0, 0.2))
    x = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).loss.backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = make(seed=9, likelihood="gaussian", free_bits=(0.1, 0.0, 0.2))
    loaded.load_state_dict(torch.load(buf))
    assert loaded.step.item() == 1
    for m in (model, loaded):
        m.eval()
    for method in ("encode", "reconstruct", "negative_elbo"):
        torch.testing.assert_close(getattr(loaded, method)(x), getattr(model, method)(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.sample(3, generator=torch.Generator().manual_seed(1)),
                               model.sample(3, generator=torch.Generator().manual_seed(1)), atol=0, rtol=0)


def _train_steps(model, x, forward, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        out = forward(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(torch.cat([out.loss.detach().view(1), out.kl_layers.detach().flatten()]))
    return torch.stack(losses)


@needs_native_cpu()
def test_compiled_training_step_matches_eager():
    kw = dict(backend="cpu", kl_warmup_steps=3, free_bits=(0.05, 0.0, 0.1))
    eager, compiled = make(**kw), make(**kw)
    x = data()
    expected = _train_steps(eager, x, eager)
    got = _train_steps(compiled, x, torch.compile(compiled, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)
    assert compiled.step.item() == 2


# ----------------------------------------------------------------------------- bad input
def test_constructor_errors():
    for dims in ((4,), 4, (), (4, 0), (4, 2.5), "ab", (True, 2)):
        with pytest.raises(ValueError, match="latent_dims must be a sequence of at least 2 positive ints"):
            HierarchicalVAE((12,), latent_dims=dims)
    with pytest.raises(TypeError, match="latent_dims must be"):
        HierarchicalVAE((12,), latent_dims=None)
    for fb in ((0.1, 0.2), (0.1, -0.2, 0.0), -1.0, float("nan"), (0.0, 0.0, float("inf"))):
        with pytest.raises(ValueError, match="free_bits must be a number >= 0 .* or a sequence of 3, one per layer"):
            HierarchicalVAE((12,), free_bits=fb)
    with pytest.raises(TypeError, match="free_bits"):
        HierarchicalVAE((12,), free_bits=None)
    with pytest.raises(ValueError, match="hidden_dims must hold at least one width"):
        HierarchicalVAE((12,), hidden_dims=())
    with pytest.raises(ValueError, match="hidden_dims must be a sequence of positive ints"):
        HierarchicalVAE((12,), hidden_dims=(8, 0))
    with pytest.raises(ValueError, match="likelihood must be one of"):
        HierarchicalVAE((12,), likelihood="poisson")
    with pytest.raises(ValueError, match="kl_warmup_steps"):
        HierarchicalVAE((12,), kl_warmup_steps=-1)


def test_bad_input():
    model = make()
    x = data()
    with pytest.raises(ValueError, match=r"x must have shape \[B, 12\]"):
        model(x[0])
    with pytest.raises(ValueError, match=r"x must have shape \[B, 12\]"):
        model.negative_elbo(torch.rand(6, 13))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model.encode(x.to(torch.int64))
    with pytest.raises(ValueError, match="y must be None"):
        model(x, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"z must have shape \[N, sum\(latent_dims\) = 9\]"):
        model.decode(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"z_top must have shape \[N, latent_dims\[-1\] = 2\]"):
        model.decode_top(torch.randn(2, 9))
    with pytest.raises(ValueError, match="k must be a positive int"):
        model.log_importance_weights(x, 0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.sample(0)
    with pytest.raises(ValueError, match="y must be None"):
        model.sample(2, 1)
