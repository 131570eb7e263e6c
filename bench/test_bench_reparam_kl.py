"""CPU cases of the reparameterize + KL benchmark for pytest-benchmark:

    pytest bench --benchmark-only                       # time them
    pytest bench --benchmark-only --benchmark-autosave  # save, then compare across commits with
    pytest bench --benchmark-only --benchmark-compare   # pytest-benchmark's own options

These are measurements, not tests of speed: nothing here asserts a time.
"""
import pytest
import torch

from reparam_kl import _prior_step, _step, prior_providers, providers

SHAPES = [(4096, 1024), (128, 32)]


@pytest.fixture(scope="module")
def cpu_providers():
    return providers("cpu")


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["eager", "torch.compile", "pyvae cpu"])
def test_reparam_kl(benchmark, cpu_providers, provider, shape, mode):
    if provider not in cpu_providers:
        pytest.skip(f"{provider} not available")
    mu = torch.randn(*shape, requires_grad=mode != "forward")
    logvar = (0.5 * torch.randn(*shape)).requires_grad_(mode != "forward")
    step = _step(cpu_providers[provider], mu, logvar, mode)
    benchmark.group = f"reparam_kl {shape[0]}x{shape[1]} {mode}"
    benchmark(step)


@pytest.fixture(scope="module")
def cpu_prior_providers():
    return prior_providers("cpu")


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", ["eager", "torch.compile", "pyvae cpu"])
def test_reparam_kl_prior(benchmark, cpu_prior_providers, provider, mode):
    """4096 x 1024 with a full-tensor Gaussian prior (a hierarchical VAE's layer)."""
    if provider not in cpu_prior_providers:
        pytest.skip(f"{provider} not available")
    inputs = [torch.randn(4096, 1024), 0.5 * torch.randn(4096, 1024), torch.randn(4096, 1024),
              0.5 * torch.randn(4096, 1024)]
    inputs = [t.requires_grad_(mode != "forward") for t in inputs]
    step = _prior_step(cpu_prior_providers[provider], inputs, mode)
    benchmark.group = f"reparam_kl 4096x1024 prior {mode}"
    benchmark(step)
