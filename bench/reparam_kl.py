"""Benchmark of pyvae.reparameterize_kl against what a VAE does today.

The eager PyTorch baseline (also compiled with torch.compile, default and
max-autotune-no-cudagraphs modes)::

    def eager_reparam_kl(mu, logvar):
        eps = torch.randn_like(mu)
        std = torch.exp(0.5 * logvar)
        z = mu + std * eps
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
        return z, kl

With a Gaussian prior (the hierarchical VAE's case: a full-tensor prior from the layer above),
the eager baseline is the same sample and the KL term for term::

    def eager_reparam_kl_prior(mu, logvar, prior_mu, prior_logvar):
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * torch.sum(prior_logvar - logvar
                             + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1, dim=-1)
        return z, kl

Minimal logical traffic per element, in bytes of the input dtype s: forward reads mu and logvar
and writes z (3s); backward reads mu, logvar and grad_z and writes grad_mu and grad_logvar (5s).
With the prior, forward reads four inputs and writes z (5s); backward reads the four and grad_z
and writes four gradients (9s). The per-sample KL (4 bytes a row) is counted too.
"""
from __future__ import annotations

import functools

import torch

import pyvae
from harness import Case, Row, time_case

OP = "reparam_kl"


def eager_reparam_kl(mu: torch.Tensor, logvar: torch.Tensor):
    eps = torch.randn_like(mu)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return z, kl


def eager_reparam_kl_prior(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor,
                           prior_logvar: torch.Tensor):
    eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * torch.sum(prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1,
                         dim=-1)
    return z, kl


def prior_shapes(device: str, full: bool) -> list[tuple[int, int]]:
    """Shapes of the cases with a full-tensor Gaussian prior (the first one is the headline)."""
    return [(4096, 1024)] if device == "cpu" or not full else [(4096, 1024), (65536, 1024)]


def shapes(device: str, full: bool) -> list[tuple[int, int]]:
    """Shapes of the cases against N(0, I): the headline (the README's) first, the sweep with ``full``."""
    if not full:
        return [(4096, 1024)]
    if device == "cpu":
        return [(4096, 1024), (1024, 256), (128, 32)]
    return [(4096, 1024), (16384, 1024), (65536, 1024), (128, 32)]


def _providers(device: str, eager, pyvae_call) -> dict:
    """eager, its two torch.compile modes, and ``pyvae_call(*inputs, backend=...)`` per pyvae backend
    (the reference and the Triton interpreter are not contenders)."""
    found = {
        "eager": eager,
        "torch.compile": torch.compile(eager),
        "torch.compile max-autotune": torch.compile(eager, mode="max-autotune-no-cudagraphs"),
    }
    for backend in pyvae.backends.available(device):
        if backend != "torch" and not (backend == "triton" and device == "cpu"):
            found[f"pyvae {backend}"] = functools.partial(pyvae_call, backend=backend)
    return found


def providers(device: str) -> dict:
    return _providers(device, eager_reparam_kl, lambda mu, lv, backend: pyvae.reparameterize_kl(mu, lv, backend=backend))


def prior_providers(device: str) -> dict:
    return _providers(device, eager_reparam_kl_prior, lambda mu, lv, pm, plv, backend: pyvae.reparameterize_kl(
        mu, lv, prior_mu=pm, prior_logvar=plv, backend=backend))


def _prior_step(fn, inputs, mode):
    def forward():
        return fn(*inputs)

    def forward_backward():
        z, kl = fn(*inputs)
        torch.autograd.backward([z, kl], [torch.ones_like(z), torch.ones_like(kl)])
        for t in inputs:
            t.grad = None

    return forward if mode == "forward" else forward_backward


def _step(fn, mu, logvar, mode):
    def forward():
        return fn(mu, logvar)

    def forward_backward():
        z, kl = fn(mu, logvar)
        torch.autograd.backward([z, kl], [torch.ones_like(z), torch.ones_like(kl)])
        mu.grad = logvar.grad = None

    return forward if mode == "forward" else forward_backward


def run(device: str, full: bool = True, dtype: torch.dtype = torch.float32, progress=None) -> list[Row]:
    rows: list[Row] = []
    elem = torch.finfo(dtype).bits // 8
    provs = providers(device)
    for batch, zdim in shapes(device, full):
        for mode in ("forward", "forward+backward"):
            n = batch * zdim
            mu = torch.randn(batch, zdim, device=device, dtype=dtype, requires_grad=mode != "forward")
            logvar = (0.5 * torch.randn(batch, zdim, device=device, dtype=dtype)).requires_grad_(mode != "forward")
            traffic = (3 if mode == "forward" else 8) * elem * n + 4 * batch * (1 if mode == "forward" else 2)
            steps = {name: _step(fn, mu, logvar, mode) for name, fn in provs.items()}
            rows += time_case(Case(OP, f"{batch}x{zdim}", dtype, mode, steps, traffic, n), device)
            if progress is not None:
                progress.update(1)
    provs = prior_providers(device)
    for batch, zdim in prior_shapes(device, full):
        for mode in ("forward", "forward+backward"):
            n = batch * zdim
            grad = mode != "forward"
            inputs = [torch.randn(batch, zdim, device=device, dtype=dtype).requires_grad_(grad),
                      (0.5 * torch.randn(batch, zdim, device=device, dtype=dtype)).requires_grad_(grad),
                      torch.randn(batch, zdim, device=device, dtype=dtype).requires_grad_(grad),
                      (0.5 * torch.randn(batch, zdim, device=device, dtype=dtype)).requires_grad_(grad)]
            traffic = (5 if mode == "forward" else 14) * elem * n + 4 * batch * (1 if mode == "forward" else 2)
            steps = {name: _prior_step(fn, inputs, mode) for name, fn in provs.items()}
            rows += time_case(Case(OP, f"{batch}x{zdim} prior", dtype, mode, steps, traffic, n), device)
            if progress is not None:
                progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    return 2 * (len(shapes(device, full)) + len(prior_shapes(device, full)))
