"""pyvae.nn.GaussianLatent's options: free bits (Kingma et al. 2016) and the reductions it passes on."""
import pytest
import torch

import pyvae


def _layer_and_input(free_bits: float, reduction: str = "per_sample", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    layer = pyvae.nn.GaussianLatent(6, 5, free_bits=free_bits, reduction=reduction)
    with torch.no_grad():
        layer.proj.weight.copy_(torch.randn(layer.proj.weight.shape, generator=gen) * 0.5)
        layer.proj.bias.copy_(torch.randn(layer.proj.bias.shape, generator=gen) * 0.5)
        # latent dims 0 and 1 with a tiny posterior shift: their batch-mean KL stays under the floor
        layer.proj.weight[:2].mul_(0.01)
        layer.proj.bias[:2] = 0.0
        layer.proj.weight[5:7].mul_(0.01)
        layer.proj.bias[5:7] = 0.0
    return layer, torch.randn(32, 6, generator=gen)


def _eager_kl_elements(mu, logvar):
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def test_free_bits_objective_and_gradient():
    floor = 0.1
    layer, h = _layer_and_input(floor)
    out = layer(h, seed=1)
    kl_el = _eager_kl_elements(out.mu.double(), out.logvar.double())
    per_dim = kl_el.mean(0)
    assert (per_dim[:2] < floor).all() and (per_dim[2:] > floor).all()  # the case covers both sides
    # the batch mean of kl_loss is sum_j max(mean_batch KL_j, floor); kl stays the true KL
    torch.testing.assert_close(out.kl_loss.mean().double(), per_dim.clamp_min(floor).sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.kl.double(), kl_el.sum(-1), atol=1e-5, rtol=1e-5)
    # gradient: the dims under the floor get none from the KL term, the others the plain KL's
    mu = out.mu.detach().requires_grad_()
    logvar = out.logvar.detach().requires_grad_()
    floored = layer._free_bits_kl(pyvae.reparameterize_kl(mu, logvar, seed=1, reduction="none")[1])
    floored.mean().backward()
    expected_mu = mu.detach() / mu.shape[0]
    expected_mu[:, :2] = 0
    torch.testing.assert_close(mu.grad, expected_mu, atol=1e-6, rtol=1e-5)
    assert (logvar.grad[:, :2] == 0).all() and (logvar.grad[:, 2:] != 0).all()


@pytest.mark.parametrize("reduction", ["none", "per_sample", "sum", "batchmean", "mean"])
def test_free_bits_follows_the_layer_reduction(reduction):
    floor = 0.1
    layer, h = _layer_and_input(floor, reduction)
    out = layer(h, seed=2)
    kl_el = _eager_kl_elements(out.mu.double(), out.logvar.double())
    floored = torch.where(kl_el.mean(0) < floor, torch.full_like(kl_el, floor), kl_el)
    expected = {"none": floored, "per_sample": floored.sum(-1), "sum": floored.sum(),
                "batchmean": floored.sum() / 32, "mean": floored.mean()}[reduction]
    true_kl = {"none": kl_el, "per_sample": kl_el.sum(-1), "sum": kl_el.sum(),
               "batchmean": kl_el.sum() / 32, "mean": kl_el.mean()}[reduction]
    torch.testing.assert_close(out.kl_loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.kl.double(), true_kl, atol=1e-5, rtol=1e-5)


def test_free_bits_only_in_training_and_off_at_zero():
    layer, h = _layer_and_input(0.0)
    out = layer(h, seed=3)
    assert out.kl_loss is out.kl
    layer, h = _layer_and_input(0.5)
    layer.eval()
    out = layer(h)
    assert out.kl_loss is out.kl
    torch.testing.assert_close(out.z, out.mu)


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_free_bits_bad_value(bad):
    with pytest.raises(ValueError, match="free_bits"):
        pyvae.nn.GaussianLatent(4, 2, free_bits=bad)


def test_bad_reduction_named_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        pyvae.nn.GaussianLatent(4, 2, reduction="avg")


def test_prior_in_forward_matches_the_op_and_gets_gradients():
    torch.manual_seed(0)
    layer = pyvae.nn.GaussianLatent(6, 5)
    h = torch.randn(7, 6)
    prior_mu = torch.randn(7, 5, requires_grad=True)
    prior_logvar = torch.randn(5, requires_grad=True)  # a learned per-dimension prior
    out = layer(h, prior=(prior_mu, prior_logvar), seed=4)
    mu, logvar = out.mu.detach().double(), out.logvar.detach().double()
    pm = prior_mu.detach().double().requires_grad_()
    plv = prior_logvar.detach().double().requires_grad_()
    expected = 0.5 * (plv - logvar + (logvar.exp() + (mu - pm) ** 2) / plv.exp() - 1).sum(-1)
    torch.testing.assert_close(out.kl.double(), expected, atol=1e-5, rtol=1e-5)
    # the prior changes only the KL: the same noise as without it
    torch.testing.assert_close(out.z, layer(h, seed=4).z)
    out.kl.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(prior_mu.grad.double(), pm.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior_logvar.grad.double(), plv.grad, atol=1e-4, rtol=1e-5)
    # prior_mu alone: the other means 0
    alone = layer(h, prior=(prior_mu.detach(), None), seed=4)
    expected_alone = 0.5 * (-logvar + logvar.exp() + (mu - pm.detach()) ** 2 - 1).sum(-1)
    torch.testing.assert_close(alone.kl.double(), expected_alone, atol=1e-5, rtol=1e-5)


def test_prior_must_be_a_pair():
    layer = pyvae.nn.GaussianLatent(4, 2)
    with pytest.raises(TypeError, match="prior"):
        layer(torch.randn(3, 4), prior=torch.zeros(2))
