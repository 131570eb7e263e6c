"""pyvae.nn.DiagonalGaussianDistribution against diffusers' (0.42), and inside diffusers'
AutoencoderKL through pyvae.integrations.diffusers (skipped where diffusers is not installed)."""
import copy
import math
import sys

import pytest
import torch

import pyvae
from pyvae.nn import DiagonalGaussianDistribution
from pyvae.ops.philox import SEED_LIMIT
from pyvae.ops.reparam_kl import reference_eps

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (run.sh installs it where it can)")
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402
from pyvae.integrations.diffusers import pyvae_posterior, use_pyvae_posterior  # noqa: E402

Theirs = diffusers_vae.DiagonalGaussianDistribution
# 4-D image latents ([B, 2C, H, W], as SD's), 5-D video latents ([B, 2C, T, H, W]); diffusers sums
# the KL over dims 1, 2, 3 of both
SHAPES = [(2, 8, 5, 6), (2, 8, 3, 4, 5)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _params(shape, dtype, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen) * spread
    c = shape[1] // 2
    logvar = p[:, c:] * 3  # log-variances over a wide range, some past the clamp at the ends
    logvar.view(-1)[:3] = torch.tensor([-45.0, 25.0, 0.0])
    p[:, c:] = logvar
    return p.to(dtype)


def _theirs_float64(p: torch.Tensor) -> Theirs:
    """diffusers' posterior of the same parameters in float64: the reference for 16-bit ones."""
    return Theirs(p.detach().double().requires_grad_())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attributes_kl_nll_and_gradients_equal_diffusers(shape, dtype):
    p = _params(shape, dtype).requires_grad_()
    q = _params(shape, dtype, seed=1).requires_grad_()
    ours, other = DiagonalGaussianDistribution(p), DiagonalGaussianDistribution(q)
    theirs, theirs_other = Theirs(p), Theirs(q)
    for name in ("mean", "logvar", "std", "var"):
        got, want = getattr(ours, name), getattr(theirs, name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert ours.parameters is p and ours.deterministic is False
    assert torch.equal(ours.mode(), theirs.mode())
    x = torch.randn(ours.mean.shape).to(dtype)
    torch.testing.assert_close(ours.nll(x), theirs.nll(x))
    torch.testing.assert_close(ours.nll(x, dims=[1, 2]), theirs.nll(x, dims=[1, 2]))
    ref, ref_other = _theirs_float64(p), _theirs_float64(q)
    for got, want, want_ref, args in ((ours.kl(), theirs.kl(), ref.kl(), (p,)),
                                      (ours.kl(other), theirs.kl(theirs_other), ref.kl(ref_other), (p, q))):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.double(), want_ref.detach(), **TOL[dtype])
        grads = torch.autograd.grad(got.double().sum(), args, retain_graph=True)
        grads_ref = torch.autograd.grad(want_ref.sum(), [ref.parameters, ref_other.parameters][:len(args)],
                                        retain_graph=True)
        for g, g_ref in zip(grads, grads_ref):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), g_ref, **TOL[dtype])


def test_audio_latents_sum_the_kl_over_dims_1_and_2():
    p = _params((3, 6, 40), torch.float32)
    ours = DiagonalGaussianDistribution(p)
    mean, logvar = p[:, :3].double(), p[:, 3:].double().clamp(-30, 20)
    want = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum([1, 2])
    torch.testing.assert_close(ours.kl().double(), want, rtol=1e-5, atol=1e-5)
    assert ours.sample().shape == (3, 3, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_is_the_fused_draw_and_kl_comes_with_it(monkeypatch, dtype):
    p = _params((2, 8, 4, 4), dtype).requires_grad_()
    calls = []
    for name in ("reparameterize_kl", "reparameterize_kl_packed"):
        real = getattr(pyvae.nn.posterior, name)
        monkeypatch.setattr(pyvae.nn.posterior, name,
                            (lambda n, r: lambda *a, **k: calls.append(n) or r(*a, **k))(name, real))
    post = DiagonalGaussianDistribution(p)
    z = post.sample(generator=torch.Generator().manual_seed(3))
    kl = post.kl()
    # one fused call, the packed op's on the parameters (the clamp inside the kernel)
    assert calls == ["reparameterize_kl_packed"], "sample() then kl() must be one fused call of the packed op"
    assert z.shape == post.mean.shape and z.dtype == dtype and kl.dtype == dtype and kl.shape == (2,)
    # the noise is the op's stream for the seed the generator gives
    seed = int(torch.randint(0, SEED_LIMIT, (), generator=torch.Generator().manual_seed(3)))
    eps = reference_eps(seed, (2, 4 * 4 * 4)).view(post.mean.shape)
    want = post.mean.double() + torch.exp(0.5 * post.logvar.double()) * eps
    torch.testing.assert_close(z.double(), want, **TOL[dtype])
    torch.testing.assert_close(kl.double(), _theirs_float64(p).kl().detach(), **TOL[dtype])
    # a seeded generator reproduces the sample; the default one does not repeat it
    again = DiagonalGaussianDistribution(p).sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, z)
    assert not torch.equal(DiagonalGaussianDistribution(p).sample(), z)
    # the reparameterization's gradients: 1 to the mean, 0.5 std eps to the log-variance (0 where clamped)
    (z.float().sum() + kl.float().sum()).backward()
    logvar = p.detach().double()[:, 4:]
    clamped = (logvar < -30) | (logvar > 20)
    ref = _theirs_float64(p)
    (ref.kl().sum()).backward()
    want_mean = 1 + ref.parameters.grad[:, :4]
    want_logvar = torch.where(clamped, 0.0, 0.5 * torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) \
        + ref.parameters.grad[:, 4:]
    torch.testing.assert_close(p.grad[:, :4].double(), want_mean, **TOL[dtype])
    torch.testing.assert_close(p.grad[:, 4:].double(), want_logvar, **TOL[dtype])


def test_sample_and_kl_keep_only_the_parameters_for_backward():
    # diffusers keeps std, var and eps beside the parameters; the packed op only the parameters and
    # the key (so less than half of diffusers' total at SD's latent shapes, bench/posterior.py)
    p = _params((2, 8, 16, 16), torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        post = DiagonalGaussianDistribution(p)
        post.sample()
        post.kl()
    big = [t for t in saved if t.numel() > 1]
    assert big and all(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for t in big)
    assert sum(t.numel() for t in saved if t.numel() == 1) <= 1  # the key


@pytest.mark.parametrize("dims", [4, 5], ids=["image", "video"])
def test_channels_last_parameters_are_read_in_place_and_keep_their_layout(dims):
    # what a CPU convolution gives an encoder: the noise is drawn in that memory order, z and the
    # gradient keep the layout (as diffusers' elementwise ops keep it); the KL and its gradient are
    # diffusers'
    shape, fmt = ((2, 8, 5, 6), torch.channels_last) if dims == 4 else ((2, 8, 3, 4, 5), torch.channels_last_3d)
    p = _params(shape, torch.float32).contiguous(memory_format=fmt).requires_grad_()
    post = DiagonalGaussianDistribution(p)
    z = post.sample(generator=torch.Generator().manual_seed(4))
    kl = post.kl()
    assert z.is_contiguous(memory_format=fmt) and not z.is_contiguous()
    (z.sum() + kl.sum()).backward()
    assert p.grad.is_contiguous(memory_format=fmt)
    seed = int(torch.randint(0, SEED_LIMIT, (), generator=torch.Generator().manual_seed(4)))
    moved = p.detach().double().movedim(1, -1)  # [..., 2C], rows of the draw
    eps = reference_eps(seed, (moved[..., :4].numel() // 4, 4)).view(moved[..., :4].shape).movedim(-1, 1)
    mean, logvar = p.detach().double().chunk(2, 1)
    torch.testing.assert_close(z.double(), mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps, **TOL[torch.float32])
    ref = _theirs_float64(p)
    torch.testing.assert_close(kl.double(), ref.kl().detach(), **TOL[torch.float32])
    grad_kl_only = torch.autograd.grad(DiagonalGaussianDistribution(p).kl().sum(), p)[0]
    torch.testing.assert_close(grad_kl_only.double(), torch.autograd.grad(ref.kl().sum(), ref.parameters)[0],
                               **TOL[torch.float32])


def test_sample_statistics():
    p = torch.zeros(4, 8, 32, 32)
    p[:, 4:] = math.log(4.0)  # std 2
    p[:, :4] = 1.5
    z = DiagonalGaussianDistribution(p).sample()
    assert abs(z.mean().item() - 1.5) < 0.05 and abs(z.std().item() - 2.0) < 0.05


def test_deterministic_posterior():
    p = _params((2, 8, 3, 3), torch.float32)
    ours, theirs = DiagonalGaussianDistribution(p, deterministic=True), Theirs(p, deterministic=True)
    assert torch.equal(ours.std, theirs.std) and torch.equal(ours.var, theirs.var)
    assert torch.equal(ours.sample(), ours.mean)
    for got, want in ((ours.kl(), theirs.kl()), (ours.nll(ours.mean), theirs.nll(theirs.mean))):
        assert torch.equal(got, want) and got.device == want.device


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match=r"parameters must be a tensor \[B, 2C, ...\]"):
        DiagonalGaussianDistribution(torch.randn(2, 3, 4, 4))


def test_under_autocast_the_posterior_keeps_its_parameters_dtype():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    kls = {}
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            post = DiagonalGaussianDistribution(conv(x))
            z = post.sample(generator=torch.Generator().manual_seed(0))
            kls[amp] = post.kl()
        assert z.dtype == kls[amp].dtype == (torch.bfloat16 if amp else torch.float32)
    torch.testing.assert_close(kls[True].float(), kls[False], rtol=2e-2, atol=0)


# ------------------------------------------------------------------------------ inside AutoencoderKL
def _tiny_autoencoder(seed=0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                   layers_per_block=1, sample_size=16)


def test_use_pyvae_posterior_is_reversible_and_copies_nothing():
    vae = _tiny_autoencoder()
    weights = {k: v.data_ptr() for k, v in vae.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    assert isinstance(vae.encode(x).latent_dist, Theirs)
    assert use_pyvae_posterior(vae) is vae
    use_pyvae_posterior(vae)  # idempotent
    post = vae.encode(x).latent_dist
    assert isinstance(post, DiagonalGaussianDistribution)
    assert isinstance(vae.encode(x, return_dict=False)[0], DiagonalGaussianDistribution)
    assert {k: v.data_ptr() for k, v in vae.state_dict().items()} == weights
    assert vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample.shape == x.shape
    twin = copy.deepcopy(vae)
    assert twin.encode.__self__ is twin and isinstance(twin.encode(x).latent_dist, DiagonalGaussianDistribution)
    use_pyvae_posterior(vae, False)
    assert isinstance(vae.encode(x).latent_dist, Theirs) and "encode" not in vae.__dict__
    with pyvae_posterior(vae):
        assert isinstance(vae.encode(x).latent_dist, DiagonalGaussianDistribution)
    assert isinstance(vae.encode(x).latent_dist, Theirs)
    with pytest.raises(TypeError, match="has no encode"):
        use_pyvae_posterior(torch.nn.Linear(2, 2))


def test_missing_diffusers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers.models.autoencoders.vae", None)
    with pytest.raises(ImportError, match="needs diffusers"):
        use_pyvae_posterior(_tiny_autoencoder())


def _train(use_pyvae: bool, monkeypatch, steps=6, beta=1e-3):
    """A few Adam steps of reconstruction + beta KL; the noise of both posteriors is pyvae's Philox
    stream for the seed each step's generator gives (diffusers' randn_tensor patched to draw it), in
    the order pyvae draws it: the parameters' memory order (channels-last where the encoder's
    convolution gives that layout)."""
    layout = {}

    def philox_randn(shape, generator=None, device=None, dtype=None, **_):
        seed = int(torch.randint(0, SEED_LIMIT, (), generator=generator, device=generator.device))
        if layout["channels_last"]:  # [B, H, W, C] rows of C
            b, c, h, w = shape
            return reference_eps(seed, (b * h * w, c)).view(b, h, w, c).permute(0, 3, 1, 2).to(dtype)
        return reference_eps(seed, (shape[0], math.prod(shape[1:]))).view(shape).to(dtype)

    monkeypatch.setattr(diffusers_vae, "randn_tensor", philox_randn)
    vae = _tiny_autoencoder()
    use_pyvae_posterior(vae, use_pyvae)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    data = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    losses = []
    for step in range(steps):
        posterior = vae.encode(data).latent_dist
        layout["channels_last"] = not posterior.parameters.is_contiguous()
        z = posterior.sample(generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, data) + beta * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_autoencoderkl_gives_diffusers_loss_curve(monkeypatch):
    """Same seed, same noise (taken from the same source): the same loss curve within float tolerance."""
    ours, theirs = _train(True, monkeypatch), _train(False, monkeypatch)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-6)
    assert ours[-1] < ours[0]
