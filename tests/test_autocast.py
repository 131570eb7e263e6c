"""Under torch.autocast (CPU bfloat16): the dtype each op returns (the README's table), and models
that train with it as they do in float32."""
import pytest
import torch

import pyvae

BF16 = torch.bfloat16


def _bf16_activations(*shape):
    """What a layer hands to an op under autocast: its bfloat16 output."""
    with torch.autocast("cpu", dtype=BF16):
        return torch.nn.Linear(shape[-1], shape[-1])(torch.randn(*shape))


# op -> (the call on bfloat16 activations h, the dtypes of its outputs); README "Mixed precision"
CASES = {
    "reparameterize_kl": (lambda h: pyvae.reparameterize_kl(h, h), (BF16, torch.float32)),
    "bernoulli_nll": (lambda h: (pyvae.bernoulli_nll(h, torch.rand(h.shape)),), (torch.float32,)),
    "gaussian_nll": (lambda h: (pyvae.gaussian_nll(h, torch.rand(h.shape)),), (torch.float32,)),
    "continuous_bernoulli_nll": (lambda h: (pyvae.continuous_bernoulli_nll(h, torch.rand(h.shape)),),
                                 (torch.float32,)),
    "discretized_mix_logistic_nll": (
        lambda h: (pyvae.discretized_mix_logistic_nll(h.flatten()[:480].reshape(2, 30, 4, 2), torch.rand(2, 3, 4, 2),
                                                      num_mix=3),), (torch.float32,)),
    "nearest_code": (lambda h: pyvae.nearest_code(h, torch.randn(5, h.shape[-1])), (torch.int64, torch.float32)),
    "vector_quantize": (lambda h: pyvae.vector_quantize(h, torch.randn(5, h.shape[-1]))[:3],
                        (BF16, torch.int64, torch.float32)),
    "finite_scalar_quantize": (lambda h: pyvae.finite_scalar_quantize(h[:, :4], (8, 5, 5, 5)), (BF16, torch.int32)),
    "residual_quantize": (lambda h: pyvae.residual_quantize(h, torch.randn(2, 5, h.shape[-1]))[:3],
                          (BF16, torch.int64, torch.float32)),
    "DiagonalGaussianDistribution": (
        lambda h: (lambda p: (p.sample(), p.kl()))(pyvae.nn.DiagonalGaussianDistribution(h.reshape(8, 8, 4, 2))),
        (BF16, BF16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_output_dtypes_under_autocast(name):
    call, dtypes = CASES[name]
    h = _bf16_activations(8, 64)
    assert h.dtype == BF16
    with torch.autocast("cpu", dtype=BF16):
        outputs = call(h)
    assert tuple(o.dtype for o in outputs) == dtypes


@pytest.mark.parametrize("model", ["vae", "vqvae"])
def test_models_train_under_autocast_as_in_float32(model):
    """A few Adam steps from the same initial weights under bfloat16 autocast and in float32: the
    losses stay within 2e-3 (relative) of each other."""
    x = torch.rand(32, 1, 8, 8).round()
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        net = (pyvae.models.VAE((1, 8, 8), latent_dim=8, hidden_dims=(64,)) if model == "vae" else
               pyvae.models.VQVAE((1, 8, 8), num_codes=16, code_dim=4, channels=(8,), downsample=1))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        curve = []
        for _ in range(5):
            with torch.autocast("cpu", dtype=BF16, enabled=amp):
                out = net(x)  # the same noise: the same generator state in both runs
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            curve.append(out.loss.item())
        losses[amp] = torch.tensor(curve)
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-3, atol=0)
