"""Benchmark of pyvae's reconstruction likelihoods against what a VAE does today.

Eager PyTorch baselines (also compiled with torch.compile, default and
max-autotune-no-cudagraphs modes), each reduced like pyvae's default (sum / B)::

    bernoulli:            F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / B
    gaussian:             F.gaussian_nll_loss(mean, target, var, full=True, reduction="sum") / B
                          (var = exp(logvar), one learned log-variance per channel)
    continuous_bernoulli: -ContinuousBernoulli(logits=logits).log_prob(target).sum() / B

Minimal logical traffic, in bytes of the input dtype s per element: forward reads prediction and
target (2s); forward+backward reads them and writes the prediction's gradient (3s), as the issue
defines it (pyvae's backward reads the inputs a second time: 5s actually move).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyvae
from harness import Case, Row, time_case

OP = "likelihood"
CHANNELS = 16


def eager_bernoulli(logits, target, logvar):
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def eager_gaussian(mean, target, logvar):
    var = logvar.exp().expand_as(mean)
    return F.gaussian_nll_loss(mean, target, var, full=True, reduction="sum") / mean.shape[0]


def eager_continuous_bernoulli(logits, target, logvar):
    return -torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False).log_prob(target).sum() / logits.shape[0]


EAGER = {"bernoulli": eager_bernoulli, "gaussian": eager_gaussian, "continuous_bernoulli": eager_continuous_bernoulli}


def pyvae_loss(loss: str, backend: str):
    if loss == "gaussian":
        return lambda mean, target, logvar: pyvae.gaussian_nll(mean, target, logvar, backend=backend)
    fn = pyvae.bernoulli_nll if loss == "bernoulli" else pyvae.continuous_bernoulli_nll
    return lambda logits, target, logvar: fn(logits, target, backend=backend)


def shapes(device: str, full: bool) -> list[tuple[int, int]]:
    """The headline shape (the README's) and, with ``full``, the sweep."""
    if not full:
        return [(4096, 4096)]
    if device == "cpu":
        return [(4096, 4096), (256, 3 * 32 * 32)]
    return [(4096, 4096), (16384, 4096), (256, 3 * 32 * 32)]


def dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


def providers(device: str, loss: str) -> dict:
    eager = EAGER[loss]
    found = {"eager": eager, "torch.compile": torch.compile(eager),
             "torch.compile max-autotune": torch.compile(eager, mode="max-autotune-no-cudagraphs")}
    for backend in pyvae.backends.available(device):
        if backend == "torch" or (backend == "triton" and device == "cpu"):
            continue
        found[f"pyvae {backend}"] = pyvae_loss(loss, backend)
    return found


def _step(fn, pred, target, logvar, mode):
    def forward():
        return fn(pred, target, logvar)

    def forward_backward():
        fn(pred, target, logvar).backward()
        pred.grad = logvar.grad = None

    return forward if mode == "forward" else forward_backward


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    rows: list[Row] = []
    for loss in EAGER:
        provs = providers(device, loss)
        for dtype in dtypes(device):
            elem = torch.finfo(dtype).bits // 8
            for batch, size in shapes(device, full):
                for mode in ("forward", "forward+backward"):
                    train = mode != "forward"
                    pred = (3 * torch.randn(batch, CHANNELS, size // CHANNELS, device=device)).to(dtype)
                    pred.requires_grad_(train)
                    target = torch.rand(batch, CHANNELS, size // CHANNELS, device=device).to(dtype)
                    logvar = torch.zeros(1, CHANNELS, 1, device=device, dtype=dtype, requires_grad=train)
                    traffic = (2 if mode == "forward" else 3) * elem * pred.numel()
                    steps = {name: _step(fn, pred, target, logvar, mode) for name, fn in provs.items()}
                    rows += time_case(Case(f"{OP} {loss}", f"{batch}x{size}", dtype, mode, steps, traffic,
                                           pred.numel()), device)
                    if progress is not None:
                        progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    return len(EAGER) * len(dtypes(device)) * len(shapes(device, full)) * 2
