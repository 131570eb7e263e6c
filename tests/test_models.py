"""pyvae.models: the shared API of VAE, ConvVAE, CVAE and VQVAE, their objectives against eager
torch.distributions, the beta schedule and free bits, save/load, torch.compile, bad input, and what
every model (HierarchicalVAE too) says about itself to a trainer."""
import io
import math

import pytest
import torch
import torch.distributions as D

import pyvae
from pyvae import metrics
from pyvae.models import CVAE, VAE, VQVAE, BaseVAE, ConvVAE, HierarchicalVAE, ImageGrid, ModelOutput
from pyvae.models.base import continuous_bernoulli_mean
from pyvae.ops.reparam_kl import reference_eps

from cases import needs_native_cpu

SMALL = {
    "vae": lambda **kw: VAE((1, 8, 8), latent_dim=4, hidden_dims=(32, 16), **kw),
    "convvae": lambda **kw: ConvVAE((1, 8, 8), latent_dim=4, channels=(4, 8), hidden_dim=16, **kw),
    "cvae": lambda **kw: CVAE((12,), 3, latent_dim=4, hidden_dims=(16,), **kw),
    "vqvae": lambda **kw: VQVAE((1, 8, 8), num_codes=8, code_dim=4, channels=(4, 8), downsample=1, **kw),
}
GAUSSIAN_FAMILY = ["vae", "convvae", "cvae"]
EVERY_MODEL = {**SMALL, "hvae": lambda **kw: HierarchicalVAE((1, 8, 8), latent_dims=(3, 2), hidden_dims=(16,), **kw)}


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return EVERY_MODEL[name](**kw)


def batch(model, b=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *model.input_shape, generator=g)
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.num_classes else None
    return x, y


def posterior(model, x, y):
    """mu, logvar from the model's own layers, by hand."""
    mu, logvar = model.latent.proj(model._features(x, y)).chunk(2, dim=-1)
    return mu, logvar


def nll_reference(model, params, x):
    """-log p(x | params) per example from torch.distributions, float64."""
    params, x = params.double(), x.double()
    if model.likelihood == "bernoulli":
        dist = D.Bernoulli(logits=params, validate_args=False)
    elif model.likelihood == "continuous_bernoulli":
        dist = D.ContinuousBernoulli(logits=params)
    else:
        dist = D.Normal(params, torch.exp(0.5 * model.recon_likelihood.logvar.double()))
    return -dist.log_prob(x).flatten(1).sum(1)


def kl_reference(mu, logvar):
    q = D.Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    return D.kl_divergence(q, D.Normal(0.0, 1.0)).sum(-1)


# ----------------------------------------------------------------------------- the API
@pytest.mark.parametrize("name", list(SMALL))
def test_forward_outputs(name):
    model = make(name)
    x, y = batch(model)
    out = model(x, y)
    assert isinstance(out, ModelOutput) and isinstance(model, BaseVAE)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.recon_loss.shape == (5,) and out.recon_loss.dtype == torch.float32
    assert out.recon.shape == x.shape
    assert ((out.recon >= 0) & (out.recon <= 1)).all()
    if name == "vqvae":
        assert out.kl is None
        assert out.z.shape == (5, 4, 4, 4)
        assert out.indices.shape == (5, 4, 4) and out.indices.dtype == torch.int64
        assert out.vq_loss.shape == () and out.perplexity.shape == ()
        torch.testing.assert_close(out.loss, out.recon_loss.mean() + out.vq_loss)
    else:
        assert out.kl.shape == (5,) and out.kl.dtype == torch.float32
        assert out.z.shape == (5, 4)
        assert out.vq_loss is None and out.indices is None and out.perplexity is None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", GAUSSIAN_FAMILY)
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
def test_loss_matches_torch_distributions(name, likelihood):
    model = make(name, likelihood=likelihood, beta=0.7)
    if likelihood == "gaussian":
        with torch.no_grad():
            model.recon_likelihood.logvar.normal_()  # a variance that is not 1
    x, y = batch(model)
    out = model(x, y)
    mu, logvar = posterior(model, x, y)
    kl = kl_reference(mu, logvar)
    params = model._params(out.z, y)
    recon = nll_reference(model, params, x)
    torch.testing.assert_close(out.kl.double(), kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon_loss.double(), recon, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), (recon + 0.7 * kl).mean(), atol=1e-4, rtol=1e-5)
    mean = {"bernoulli": torch.sigmoid(params), "continuous_bernoulli": D.ContinuousBernoulli(logits=params.double()).mean,
            "gaussian": params}[likelihood]
    torch.testing.assert_close(out.recon.double(), mean.double(), atol=1e-6, rtol=1e-5)
    # z is a draw from q: (z - mu) / std is the op's noise, not zero, and in eval mode z = mu
    assert not torch.allclose(out.z, mu)
    model.eval()
    torch.testing.assert_close(model(x, y).z, mu)
    torch.testing.assert_close(model.encode(x, y), mu)


def test_gaussian_learned_variance_is_per_channel():
    model = ConvVAE((3, 8, 8), likelihood="gaussian", channels=(4,), hidden_dim=8)
    assert model.recon_likelihood.logvar.shape == (3, 1, 1)
    assert VAE((10,), likelihood="gaussian").recon_likelihood.logvar.shape == ()
    fixed = VAE((10,), likelihood="gaussian", gaussian_logvar=-1.0)
    assert fixed.recon_likelihood.logvar == -1.0 and not list(fixed.recon_likelihood.parameters())


def test_continuous_bernoulli_mean_near_half_and_saturated():
    logits = torch.cat([torch.linspace(-1e-3, 1e-3, 21), torch.linspace(-1.2, 1.2, 49), torch.tensor([-3., 3.]),
                        torch.tensor([0.0, 0.999, -0.999, 1.0, -1.0, 1.001])])
    expected = D.ContinuousBernoulli(logits=logits.double()).mean
    got = continuous_bernoulli_mean(logits)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, atol=3e-7, rtol=0)
    assert (got[logits == 0] == 0.5).all()
    # torch.distributions loses digits for saturated lambda (and clamps |l| to 36); the mean is 1/(1 - e^-l) - 1/l
    far = torch.tensor([-200.0, -50.0, -30.0, -5.0, 5.0, 30.0, 50.0, 200.0], dtype=torch.float64)
    torch.testing.assert_close(continuous_bernoulli_mean(far.float()).double(), 1 / (1 - torch.exp(-far)) - 1 / far,
                               atol=1e-7, rtol=1e-6)
    got64 = continuous_bernoulli_mean(logits.double())
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, atol=1e-12, rtol=0)
    assert continuous_bernoulli_mean(logits.half()).dtype == torch.float16


def test_decode_is_in_data_space():
    for likelihood in ("bernoulli", "continuous_bernoulli"):
        model = make("vae", likelihood=likelihood)
        p = model.decode(torch.randn(7, 4) * 100)
        assert p.shape == (7, 1, 8, 8) and (p >= 0).all() and (p <= 1).all()
    model = make("vae", likelihood="gaussian")
    z = torch.randn(3, 4)
    torch.testing.assert_close(model.decode(z), model._params(z, None))


def test_cvae_conditions_encoder_and_decoder():
    model = make("cvae")
    x, _ = batch(model)
    zeros, ones = torch.zeros(5, dtype=torch.int64), torch.ones(5, dtype=torch.int64)
    assert not torch.allclose(model.encode(x, zeros), model.encode(x, ones))
    z = torch.randn(5, 4)
    assert not torch.allclose(model.decode(z, zeros), model.decode(z, ones))
    # the one-hot input: label j adds column j of the first layer's weight for its one-hot slot
    first = model.encoder[0]
    h0 = first(torch.cat([x, torch.nn.functional.one_hot(zeros, 3).float()], 1))
    h2 = first(torch.cat([x, torch.nn.functional.one_hot(zeros + 2, 3).float()], 1))
    torch.testing.assert_close(h2 - h0, (first.weight[:, 14] - first.weight[:, 12]).expand(5, -1))
    assert model.sample(4, 2).shape == (4, 12)


# ----------------------------------------------------------------------------- beta schedule, free bits
def test_kl_warmup_ramps_beta_linearly():
    model = make("vae", beta=2.0, kl_warmup_steps=4)
    x, _ = batch(model)
    betas = []
    for _ in range(7):
        beta = model.current_beta()
        betas.append(beta.item())
        out = model(x)
        torch.testing.assert_close(out.loss, (out.recon_loss + beta * out.kl).mean())
    assert betas == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert model.step.item() == 7
    model.eval()
    model(x)  # eval-mode forward is no training step
    assert model.step.item() == 7
    restored = make("vae", seed=3, beta=2.0, kl_warmup_steps=40)
    restored.load_state_dict(make("vae", beta=2.0, kl_warmup_steps=40).state_dict())
    assert restored.current_beta().item() == 0.0
    restored.load_state_dict(model.state_dict())
    assert restored.step.item() == 7 and restored.current_beta().item() == pytest.approx(2.0 * 7 / 40)
    assert make("vae", beta=0.3).current_beta().item() == pytest.approx(0.3)


def test_free_bits_floor():
    model = make("vae", free_bits=0.4)
    x, _ = batch(model, b=16)
    with torch.no_grad():  # spread the posterior: some dimensions above the floor, some below
        model.latent.proj.weight[:2] *= 40
    out = model(x)
    mu, logvar = posterior(model, x, None)
    q = D.Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    kl_elem = D.kl_divergence(q, D.Normal(0.0, 1.0))
    per_dim = kl_elem.mean(0)
    assert (per_dim > 0.4).any() and (per_dim < 0.4).any()
    floored = torch.clamp(per_dim, min=0.4).sum()
    torch.testing.assert_close(out.loss.double(), out.recon_loss.double().mean() + floored, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.kl.double(), kl_elem.sum(1), atol=1e-5, rtol=1e-5)  # kl stays the true KL
    # a dimension under the floor gets no gradient from the KL term
    model.zero_grad()
    (out.loss - out.recon_loss.mean()).backward()
    grad_mu_rows = model.latent.proj.weight.grad[:4]
    assert torch.all(grad_mu_rows[per_dim < 0.4] == 0) and torch.all(grad_mu_rows[per_dim > 0.4].abs().sum(1) > 0)
    model.eval()  # no floor in eval mode
    out = model(x)
    torch.testing.assert_close(out.loss, (out.recon_loss + out.kl).mean())


# ----------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", list(SMALL))
def test_method_shapes(name):
    model = make(name).eval()
    x, y = batch(model)
    label = None if y is None else 1
    ys = None if y is None else y[:3]
    assert model.sample(3, ys, generator=torch.Generator().manual_seed(0)).shape == (3, *model.input_shape)
    torch.testing.assert_close(model.sample(3, ys, generator=torch.Generator().manual_seed(4)),
                               model.sample(3, ys, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(model.reconstruct(x, y), model.decode(model.encode(x, y), y))
    for method in ("linear", "slerp"):
        path = model.interpolate(x[0], x[1], steps=6, method=method, y=label)
        assert path.shape == (6, *model.input_shape)
        ends = model.reconstruct(x[:2], None if y is None else torch.full((2,), 1))
        torch.testing.assert_close(path[[0, -1]], ends, atol=1e-5, rtol=1e-5)
    score = model.anomaly_score(x, y)
    assert score.shape == (5,) and score.dtype == torch.float32 and not score.requires_grad
    torch.testing.assert_close(score, model.anomaly_score(x, y))  # seeded: repeatable


# ----------------------------------------------------------------------------- what a trainer asks
@pytest.mark.parametrize("name", list(EVERY_MODEL))
def test_class_attributes_say_what_the_model_does(name):
    # a trainer reads these instead of the model's name: each must say what the model does
    model = make(name).eval()
    x, y = batch(model)
    assert model.conditional == (y is not None) == (type(model).conditional)
    if model.conditional:
        with pytest.raises(ValueError, match="y is required"):
            model(x)
    else:
        with pytest.raises(ValueError, match="y must be None"):
            model(x, torch.zeros(len(x), dtype=torch.int64))
    out = model(x, y)
    assert model.continuous_latent == (out.kl is not None) == (model.fixed_kl is None)
    if model.continuous_latent:
        assert model.encode(x, y).shape == (len(x), model.latent_dim)
    else:  # the KL term of the negative ELBO is the same for every input
        torch.testing.assert_close(model.negative_elbo(x, y) - model.fixed_kl, out.recon_loss)


@pytest.mark.parametrize("name", list(EVERY_MODEL))
def test_evaluation_metrics(name):
    model = make(name)
    x, y = batch(model, b=7)
    x_train, _ = batch(model, b=9, seed=2)
    torch.manual_seed(5)
    m = model.evaluation_metrics(x, y, x_train=x_train, iwae_k=4, seed=3)
    assert model.training and model.step.item() == 0  # evaluated in eval mode, its mode restored
    assert next(iter(m)) == "test_negative_elbo"
    assert m["test_negative_elbo"] == pytest.approx(model.eval().negative_elbo(x, y).double().mean().item(), rel=1e-6)
    torch.manual_seed(5)
    assert m == model.evaluation_metrics(x, y, x_train=x_train, iwae_k=4, seed=3)  # repeatable
    if model.continuous_latent:
        common = ["test_negative_elbo", "test_kl", "test_recon_nll", "iwae_nll_k4", "active_units", "latent_dim",
                  "latent_variances"]
        if name == "hvae":
            assert list(m) == [*common[:2], "test_kl_layers", *common[2:], "latent_dims", "active_units_layers"]
            assert sum(m["test_kl_layers"]) == pytest.approx(m["test_kl"]) and m["latent_dims"] == [3, 2]
        else:
            assert list(m) == common
            assert m["test_kl"] == pytest.approx(model(x, y).kl.double().mean().item(), rel=1e-6)
        assert m["test_recon_nll"] == pytest.approx(m["test_negative_elbo"] - m["test_kl"])
        assert m["iwae_nll_k4"] == pytest.approx(metrics.iwae_nll(model, x, 4, y, seed=3).double().mean().item())
        count, variances = metrics.active_units(model, x, y=y, return_variances=True)
        assert m["active_units"] == count and m["latent_variances"] == pytest.approx(variances.tolist(), abs=1e-6)
    else:
        assert list(m) == ["test_negative_elbo", "test_recon_nll", "num_codes", "latent_grid", "num_quantizers",
                           "code_usage", "codes_used", "perplexity", "train_code_usage", "train_perplexity",
                           "code_counts"]
        assert m["test_recon_nll"] == pytest.approx(m["test_negative_elbo"] - model.fixed_kl, rel=1e-6)
        assert m["code_counts"] == torch.bincount(model.encode_indices(x).flatten(), minlength=8).tolist()
        assert m["codes_used"] == sum(c > 0 for c in m["code_counts"]) and m["latent_grid"] == [4, 4]
        assert "train_code_usage" not in model.evaluation_metrics(x, y)


@pytest.mark.parametrize("name", list(EVERY_MODEL))
def test_pictures_a_model_gives(name):
    model = make(name).eval()
    grid = model.prior_samples(4, generator=torch.Generator().manual_seed(0))
    assert isinstance(grid, ImageGrid) and grid.ncols == 4
    assert grid.images.shape == (4 * (model.num_classes or 4), *model.input_shape)
    if model.conditional:  # a row per class
        labels = torch.arange(model.num_classes).repeat_interleave(4)
        torch.testing.assert_close(grid.images, model.sample(len(labels), labels,
                                                             generator=torch.Generator().manual_seed(0)))
    if model.continuous_latent:
        variances = torch.zeros(model.latent_dim)
        variances[-1] = 0.5  # one active unit, in the top layer of a hierarchy
        traversal = model.latent_traversal(variances)
        assert traversal.ncols == 9 and traversal.images.shape == (9, *model.input_shape)
        assert "1 most active" in traversal.title
    else:
        assert not hasattr(model, "latent_traversal")


def test_interpolation_paths():
    model = make("vae").eval()
    x, _ = batch(model)
    mu = model.encode(x[:2]).double()
    model.decode = lambda z, y=None: z  # look at the latent path itself
    lin = model.interpolate(x[0], x[1], steps=5).double()
    t = torch.linspace(0, 1, 5, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(lin, (1 - t) * mu[0] + t * mu[1], atol=1e-6, rtol=1e-6)
    # slerp between two latents of equal norm 2 at 2 radians: constant norm and angular speed
    ends = torch.tensor([[2.0, 0, 0, 0], [2 * math.cos(2.0), 2 * math.sin(2.0), 0, 0]])
    model.encode = lambda x, y=None: ends
    sl = model.interpolate(x[0], x[1], steps=5, method="slerp").double()
    torch.testing.assert_close(sl.norm(dim=1), torch.full((5,), 2.0, dtype=torch.float64))
    angles = torch.atan2(sl[:, 1], sl[:, 0])
    torch.testing.assert_close(angles, torch.linspace(0, 2.0, 5, dtype=torch.float64))
    assert (sl[:, 2:] == 0).all()
    del model.encode
    same = model.interpolate(x[0], x[0], steps=4, method="slerp")  # parallel endpoints: no NaN
    torch.testing.assert_close(same, model.encode(x[:1]).expand(4, -1))


@pytest.mark.parametrize("name", GAUSSIAN_FAMILY)
def test_negative_elbo_against_reference(name):
    model = make(name, beta=5.0, free_bits=3.0)  # neither enters the negative ELBO
    x, y = batch(model)
    for mode in (True, False):
        model.train(mode)
        got = model.negative_elbo(x, y, seed=11)
        assert model.training == mode
        mu, logvar = posterior(model, x, y)
        z = mu.double() + torch.exp(0.5 * logvar.double()) * reference_eps(11, mu.shape, 1, torch.float64)[0]
        expected = nll_reference(model, model._params(z.float(), y), x) + kl_reference(mu, logvar)
        torch.testing.assert_close(got.double(), expected.detach(), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(model.anomaly_score(x, y, seed=11), got)
    assert not torch.equal(model.negative_elbo(x, y, seed=12), got)


# ----------------------------------------------------------------------------- VQVAE
def test_vqvae_quantizes_the_channel_last_grid():
    model = make("vqvae")
    x, _ = batch(model)
    z_e = model.encoder(x)
    before = model.vq.codebook.clone()
    out = model(x)
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, 4).double()
    nearest = torch.cdist(vectors, before.double()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), nearest)
    torch.testing.assert_close(out.z.permute(0, 2, 3, 1).reshape(-1, 4), before[nearest])
    torch.testing.assert_close(out.vq_loss, 0.25 * (z_e - out.z).square().mean())  # EMA: commitment only
    torch.testing.assert_close(out.perplexity, metrics.perplexity(out.indices, 8))
    assert not torch.equal(model.vq.codebook, before)  # the EMA step ran
    after = model.vq.codebook.clone()
    model.encode(x)  # training mode, but encode takes no EMA step
    assert torch.equal(model.vq.codebook, after)
    model.eval()
    out = model(x)
    torch.testing.assert_close(model.decode_indices(out.indices), out.recon)
    torch.testing.assert_close(model.anomaly_score(x).mean(), out.loss)
    kl = 4 * 4 * math.log(8)
    torch.testing.assert_close(model.negative_elbo(x), out.recon_loss + kl)


def test_vqvae_learned_codebook_and_options():
    model = make("vqvae", ema_decay=None, beta=0.5)
    x, _ = batch(model)
    out = model(x)
    torch.testing.assert_close(out.vq_loss, 1.5 * (model.encoder(x) - out.z).square().mean())
    assert model.vq.codebook.requires_grad
    out.loss.backward()
    assert model.vq.codebook.grad is not None
    big = VQVAE((3, 64, 64))
    assert big.latent_shape == (16, 16) and big.num_codes == 128 and big.code_dim == 16
    assert big(torch.rand(2, 3, 64, 64)).indices.shape == (2, 16, 16)
    odd = VQVAE((1, 7, 9), channels=(4,), downsample=1, num_codes=4, code_dim=2)
    assert odd.latent_shape == (4, 5) and odd(torch.rand(2, 1, 7, 9)).recon.shape == (2, 1, 7, 9)


def test_vqvae_samples_follow_code_usage():
    model = make("vqvae").eval()
    usage = torch.zeros(8)
    usage[3] = 1.0
    if hasattr(model.vq, "usage"):
        model.vq.usage.copy_(usage)
    else:
        model.vq.register_buffer("usage", usage)
    samples = model.sample(2)
    torch.testing.assert_close(samples, model.decode_indices(torch.full((2, 4, 4), 3)))
    model.vq.usage.zero_()  # before any training step: uniform
    codes = {tuple(s.flatten().tolist()) for s in model.sample(6, generator=torch.Generator().manual_seed(0))}
    assert len(codes) == 6


def test_vqvae_passes_quantizer_options():
    model = VQVAE((1, 8, 8), num_codes=8, code_dim=4, channels=(4,), downsample=1, dead_code_threshold=2.5,
                  kmeans_init=True, straight_through="rotation", usage_decay=0.9)
    vq = model.vq
    assert (vq.dead_code_threshold, vq.kmeans_init, vq.straight_through, vq.usage_decay) == (2.5, True, "rotation", 0.9)
    assert VQVAE((1, 8, 8)).vq.dead_code_threshold == 1.0
    assert VQVAE((1, 8, 8), ema_decay=None).vq.dead_code_threshold == 0.0
    with pytest.raises(TypeError, match="unexpected keyword"):
        VQVAE((1, 8, 8), codebook_size=3)


def test_vqvae_cosine_codes():
    model = make("vqvae", cosine=True)
    x, _ = batch(model)
    model(x)
    model.eval()
    out = model(x)
    torch.testing.assert_close(out.z.norm(dim=1), torch.ones(5, 4, 4))
    torch.testing.assert_close(model.decode_indices(out.indices), out.recon)
    torch.testing.assert_close(model.anomaly_score(x).mean(), out.loss)


# ----------------------------------------------------------------------------- save / load, compile
@pytest.mark.parametrize("name", list(SMALL))
def test_state_dict_round_trip(name):
    model = make(name, likelihood="gaussian")
    x, y = batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x, y).loss.backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = make(name, seed=9, likelihood="gaussian")
    loaded.load_state_dict(torch.load(buf))
    assert loaded.step.item() == 1
    for m in (model, loaded):
        m.eval()
    torch.testing.assert_close(loaded.encode(x, y), model.encode(x, y), atol=0, rtol=0)
    torch.testing.assert_close(loaded.reconstruct(x, y), model.reconstruct(x, y), atol=0, rtol=0)
    torch.testing.assert_close(loaded.negative_elbo(x, y), model.negative_elbo(x, y), atol=0, rtol=0)
    for m in (model, loaded):
        m.train()
    torch.manual_seed(5)
    a = model(x, y)
    torch.manual_seed(5)
    b = loaded(x, y)
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)


def _train_steps(model, x, y, forward, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        out = forward(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name,backend", [("vae", "inductor"), ("cvae", "aot_eager"), ("convvae", "aot_eager"),
                                          ("vqvae", "aot_eager")])
@needs_native_cpu()
def test_compiled_training_step_matches_eager(name, backend):
    kw = {"backend": "cpu"}
    if name != "vqvae":  # the beta ramp's gradient: step 0 has beta = 0, step 1 beta = 1/3
        kw.update(kl_warmup_steps=3, free_bits=0.05 if name == "vae" else 0.0)
    eager, compiled = make(name, **kw), make(name, **kw)
    x, y = batch(model=eager, b=6)
    expected = _train_steps(eager, x, y, eager)
    got = _train_steps(compiled, x, y, torch.compile(compiled, fullgraph=True, backend=backend))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)  # inductor reorders float sums
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)
    assert compiled.step.item() == 2


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", list(SMALL))
def test_bad_x(name):
    model = make(name)
    x, y = batch(model)
    with pytest.raises(ValueError, match=r"x must have shape \[B, " + ", ".join(map(str, model.input_shape))):
        model(x[0], y)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.rand(5, 99), y)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model((x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match="x must be a tensor"):
        model(x.tolist(), y)
    with pytest.raises(ValueError, match="x must have shape"):
        model.encode(x[..., :-1], y)
    with pytest.raises(ValueError, match="z must have shape"):
        model.decode(torch.randn(2, 99), None if y is None else y[:2])
    with pytest.raises(ValueError, match="x1 must be one example"):
        model.interpolate(x, x[1])
    with pytest.raises(ValueError, match="method must be"):
        model.interpolate(x[0], x[1], method="cubic", y=None if y is None else 0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.sample(0)


@pytest.mark.parametrize("name", ["vae", "convvae", "vqvae"])
def test_labels_rejected_by_unconditional_models(name):
    model = make(name)
    x, _ = batch(model)
    with pytest.raises(ValueError, match="y must be None"):
        model(x, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must be None"):
        model.sample(2, 1)


def test_cvae_label_errors():
    model = make("cvae")
    x, y = batch(model)
    with pytest.raises(ValueError, match="y is required"):
        model(x)
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 3\), got values in \[0, 3\]"):
        model(x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"y must hold class labels"):
        model.encode(x, torch.tensor([0, -1, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"y must have shape \[B\] = \[5\]"):
        model(x, y[:4])
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        model(x, y.float())
    with pytest.raises(ValueError, match="y is required"):
        model.sample(2)
    with pytest.raises(ValueError, match="y must hold class labels"):
        model.sample(2, 7)
    with pytest.raises(ValueError, match="y must be one label"):
        model.interpolate(x[0], x[1], y=y[:2])


def test_constructor_errors():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        VAE((4,), likelihood="poisson")
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        ConvVAE((8, 8))
    with pytest.raises(ValueError, match="input_shape must be a non-empty sequence of positive ints"):
        VAE((0, 4))
    with pytest.raises(ValueError, match="kl_warmup_steps"):
        VAE((4,), kl_warmup_steps=-1)
    with pytest.raises(ValueError, match="free_bits"):
        VAE((4,), free_bits=-0.1)
    with pytest.raises(ValueError, match="beta"):
        VAE((4,), beta=float("nan"))
    with pytest.raises(ValueError, match="num_classes"):
        CVAE((4,), 0)
    with pytest.raises(ValueError, match="downsample"):
        VQVAE((1, 8, 8), channels=(4,), downsample=2)
    with pytest.raises(ValueError, match="latent_dim"):
        ConvVAE((1, 8, 8), latent_dim=0)


@pytest.mark.parametrize("name", list(SMALL))
def test_inference_methods_leave_the_generator_alone(name):
    model = make(name)
    x, y = batch(model)
    state = torch.get_rng_state()
    model.encode(x, y)
    model.reconstruct(x, y)
    model.negative_elbo(x, y)
    model.anomaly_score(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model.step.item() == 0


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
def test_forward_recon_is_detached_and_not_kept_for_backward(likelihood):
    # recon is for looking at: autograd must not keep it (a Bernoulli VAE would otherwise hold a
    # second image-sized tensor, the sigmoid's output, through backward)
    model = pyvae.models.ConvVAE((1, 8, 8), latent_dim=3, channels=(4,), hidden_dim=8, likelihood=likelihood)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.rand(5, 1, 8, 8))
    assert not out.recon.requires_grad
    assert out.recon.untyped_storage().data_ptr() not in saved
    out.loss.backward()
    torch.testing.assert_close(out.recon, model._to_data(model._params(out.z, None)))
