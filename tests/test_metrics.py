"""pyvae.metrics: iwae_nll against a float64 torch.distributions reference and its ordering in k,
active_units on models with known active dimensions, perplexity and code usage by hand."""
import math

import pytest
import torch
import torch.distributions as D

import pyvae
from pyvae import metrics
from pyvae.models import CVAE, VAE, VQVAE, ConvVAE
from pyvae.ops.reparam_kl import reference_eps

TINY = {
    "vae": lambda **kw: VAE((6,), latent_dim=3, hidden_dims=(8,), **kw),
    "cvae": lambda **kw: CVAE((6,), 3, latent_dim=3, hidden_dims=(8,), **kw),
    "convvae": lambda **kw: ConvVAE((1, 4, 4), latent_dim=3, channels=(2,), hidden_dim=8, **kw),
}


def tiny(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = TINY[name](**kw)
    with torch.no_grad():  # a posterior wider than at initialisation, far from the true one
        model.latent.proj.weight.mul_(3.0)
    return model


def data(model, b, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *model.input_shape, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.num_classes else None
    return x, y


def iwae_reference(model, x, y, k, seed):
    """-log (1/k sum_i p(x, z_i) / q(z_i|x)) from torch.distributions with the op's noise; the
    model's layers (no pyvae op among them) must be float64 already."""
    with torch.no_grad():
        x64 = x.double()
        mu, logvar = model.latent.proj(model._features(x64, y)).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * reference_eps(seed, mu.shape, k, torch.float64)          # [k, B, Z]
        ys = None if y is None else y.repeat(k)
        params = model._params(z.reshape(-1, z.shape[-1]), ys).reshape(k, *x.shape)
        if model.likelihood == "gaussian":
            px = D.Normal(params, torch.exp(0.5 * model.recon_likelihood.logvar))
        else:
            px = D.Bernoulli(logits=params, validate_args=False)
        log_px = px.log_prob(x64).flatten(2).sum(-1)
        log_pz = D.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = D.Normal(mu, std).log_prob(z).sum(-1)
    return math.log(k) - torch.logsumexp(log_px + log_pz - log_qz, dim=0)


# ----------------------------------------------------------------------------- iwae_nll
@pytest.mark.parametrize("name,likelihood", [("vae", "bernoulli"), ("cvae", "bernoulli"), ("convvae", "bernoulli"),
                                             ("vae", "gaussian")])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_iwae_matches_float64_reference(name, likelihood, batch_size):
    model = tiny(name, likelihood=likelihood, backend="torch").double()
    x, y = data(model, 5, dtype=torch.float64)
    got = metrics.iwae_nll(model, x, k=7, y=y, batch_size=batch_size, seed=3)
    assert got.shape == (5,) and got.dtype == torch.float64
    chunk = batch_size or 5
    expected = torch.cat([iwae_reference(model, x[i:i + chunk], None if y is None else y[i:i + chunk], 7, 3)
                          for i in range(0, 5, chunk)])
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", list(TINY))
def test_iwae_float32_fused_ops_match_float64_reference(name):
    model = tiny(name)  # backend auto: the fused CPU ops, float32
    x, y = data(model, 6)
    got = metrics.iwae_nll(model, x, k=9, y=y, seed=5)
    assert got.dtype == torch.float32
    expected = iwae_reference(model.double(), x, y, 9, 5)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


def test_iwae_k1_is_the_negative_elbo_in_expectation():
    model = tiny("vae")
    x, _ = data(model, 8)
    x = x.repeat(500, 1)  # every row its own posterior draw
    diff = (metrics.iwae_nll(model, x, k=1, seed=7) - model.negative_elbo(x, seed=8)).double()
    se = diff.std() / math.sqrt(diff.numel())
    assert diff.std() > 0.05  # the two differ per draw: log q - log p against the analytic KL ...
    assert abs(diff.mean()) < 4 * se  # ... and agree in expectation


def test_iwae_tightens_with_k():
    model = tiny("vae")
    x, _ = data(model, 1024)
    bounds = {k: metrics.iwae_nll(model, x, k=k, seed=11).double() for k in (1, 4, 32)}
    for small, large in ((1, 4), (4, 32)):
        gap = bounds[small] - bounds[large]
        assert gap.mean() > 4 * gap.std() / math.sqrt(gap.numel()), (small, large, gap.mean())


def test_iwae_leaves_the_model_as_it_was():
    model = tiny("vae")
    x, _ = data(model, 4)
    model.train()
    out = metrics.iwae_nll(model, x, k=3)
    assert model.training and not out.requires_grad and model.step.item() == 0
    model.eval()
    metrics.iwae_nll(model, x, k=3)
    assert not model.training


def test_iwae_of_vqvae_is_its_negative_elbo():
    torch.manual_seed(0)
    model = VQVAE((1, 8, 8), num_codes=8, code_dim=4, channels=(4,), downsample=1).eval()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(metrics.iwae_nll(model, x, k=5), model.negative_elbo(x))


def test_iwae_bad_arguments():
    model = tiny("vae")
    x, _ = data(model, 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        metrics.iwae_nll(model, x, k=0)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.iwae_nll(model, x, k=2, batch_size=0)
    with pytest.raises(TypeError, match="log_importance_weights"):
        metrics.iwae_nll(torch.nn.Linear(6, 6), x)
    with pytest.raises(ValueError, match="x must have shape"):
        metrics.iwae_nll(model, x[:, :5], k=2)
    with pytest.raises(ValueError, match="y is required"):
        metrics.iwae_nll(tiny("cvae"), x, k=2)


# ----------------------------------------------------------------------------- active_units
def test_active_units_counts_dims_whose_mean_varies():
    torch.manual_seed(0)
    model = VAE((10,), latent_dim=6, hidden_dims=())  # mu = W x + b: known variances
    with torch.no_grad():
        w = model.latent.proj.weight
        w[:6] = 0.0
        w[0, 0] = 1.0    # Var(x_0) = 1/12 > 0.01: active
        w[1, 1:3] = 2.0  # Var(2 x_1 + 2 x_2) = 8/12: active
        w[2, 3] = 0.2    # 0.04 / 12 = 0.0033 < 0.01: inactive
        w[3, 4] = 0.5    # 0.25 / 12 = 0.021: active; rows 4, 5: constant mean
    x = torch.rand(4000, 10, generator=torch.Generator().manual_seed(2))
    count, variances = metrics.active_units(model, x, return_variances=True)
    assert count == 3
    expected = torch.tensor([1 / 12, 8 / 12, 0.04 / 12, 0.25 / 12, 0, 0])
    torch.testing.assert_close(variances, expected, atol=5e-3, rtol=0.1)
    assert variances[4] == 0 and variances[5] == 0
    exact = model.encode(x).double().var(0)  # the sample variance of the means, independently
    torch.testing.assert_close(variances.double(), exact, atol=1e-7, rtol=1e-5)
    assert metrics.active_units(model, x, threshold=0.001) == 4
    assert metrics.active_units(model, x, threshold=0.5) == 1
    chunked, v2 = metrics.active_units(model, x, batch_size=333, return_variances=True)
    assert chunked == 3
    torch.testing.assert_close(v2, variances)


def test_active_units_bad_input():
    model = tiny("cvae")
    x, y = data(model, 4)
    assert isinstance(metrics.active_units(model, x, y=y), int)
    with pytest.raises(ValueError, match="at least 2 examples"):
        metrics.active_units(model, x[:1], y=y[:1])
    with pytest.raises(ValueError, match="threshold"):
        metrics.active_units(model, x, threshold=-1, y=y)
    vq = VQVAE((1, 4, 4), num_codes=4, code_dim=2, channels=(2,), downsample=1)
    with pytest.raises(TypeError, match="posterior means"):
        metrics.active_units(vq, torch.rand(3, 1, 4, 4))


# ----------------------------------------------------------------------------- perplexity, code usage
def test_perplexity_by_hand():
    got = metrics.perplexity(torch.tensor([[0, 0], [1, 2]]), 4)
    # p = (1/2, 1/4, 1/4, 0): H = 1/2 log 2 + 2 * 1/4 log 4 = 1.5 log 2
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(2 ** 1.5, rel=1e-6)
    assert metrics.perplexity(torch.arange(7).repeat(3), 7).item() == pytest.approx(7.0, rel=1e-6)
    assert metrics.perplexity(torch.full((5,), 3), 9).item() == pytest.approx(1.0)
    assert metrics.code_usage(torch.tensor([[0, 0], [1, 2]]), 4) == 0.75


def test_perplexity_matches_the_op():
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(300, 4, generator=g), torch.randn(16, 4, generator=g)
    result = pyvae.vector_quantize(x, codebook)
    torch.testing.assert_close(metrics.perplexity(result.indices, 16), result.perplexity)


def test_perplexity_bad_input():
    with pytest.raises(TypeError, match="int64"):
        metrics.perplexity(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_codes = 2\), got values in \[0, 2\]"):
        metrics.perplexity(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="num_codes"):
        metrics.perplexity(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="empty"):
        metrics.perplexity(torch.zeros(0, dtype=torch.int64), 3)
