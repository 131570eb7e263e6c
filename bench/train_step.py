"""Benchmark of one optimiser step of pyvae's models against the same models in eager PyTorch.

Cases (the shapes where the VAE-specific steps matter):

    convvae  pyvae.models.ConvVAE on 3x64x64 images, batch 128, latent 128, Bernoulli likelihood.
             eager: the same network and parameters, with the VAE steps as eager models write them
             (pytorch/examples' VAE, pythae): ``eps = randn_like(std)``, ``z = mu + std * eps``, the
             KL formula, a sigmoid at the decoder's output (the reconstruction) and
             ``binary_cross_entropy`` of it, summed per example.
    vqvae    pyvae.models.VQVAE on 3x64x64 images (a 16x16 latent grid), K=1024 codes of D=64,
             EMA codebook (decay 0.99), commitment 0.25, unit-variance Gaussian likelihood,
             batch 64, no dead-code restarts (so that every provider does the same work).
             eager: the same network, with the full N x K distance matrix, ``argmin``, the EMA update
             from ``bincount`` / ``index_add_`` and the straight-through estimator;
             vector-quantize-pytorch: the same encoder and decoder around its ``VectorQuantize``
             (``decay=0.99, commitment_weight=0.25, rotation_trick=False``, the same estimator).
    hvae     pyvae.models.HierarchicalVAE with 4 stochastic layers, latent_dims (256, 128, 64, 32), on
             flattened 784-pixel inputs (an MLP of width 256), batch 512, Bernoulli likelihood.
             eager: the same modules and parameters (the model's own bottom-up and top-down passes),
             with every layer's sample and KL against its prior as eager code writes them:
             ``z = mu + exp(0.5 logvar) * randn_like``, ``KL = 0.5 (prior_logvar - logvar + (exp(logvar)
             + (mu - prior_mu)^2) / exp(prior_logvar) - 1)`` (against N(0, I) at the top), and a sigmoid
             + ``binary_cross_entropy`` at the output.

Every provider runs ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` with Adam on its own
copy of the model. Rows report the step time (the note gives steps per second) and peak memory;
``x eager`` is the speed-up over the eager model.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

import pyvae
from harness import Case, Row, time_case

OP = "train_step"
_LOG_2PI = math.log(2 * math.pi)


def shapes(device: str, full: bool) -> dict:
    """One case per model, the same in the headline and the full sweep (the README's)."""
    # (batch, channels, size, latent) for the ConvVAE; (batch, channels, size, K, D) for the VQ-VAE;
    # (batch, features, latent_dims, hidden width) for the hierarchical VAE.
    hvae = (256, 128, 64, 32)
    return {"convvae": [(128, 3, 64, 128)], "vqvae": [(64, 3, 64, 1024, 64)], "hvae": [(512, 784, hvae, 256)]}


def _training_step(model: torch.nn.Module, loss_fn, x: torch.Tensor):
    """A zero-argument step: loss, backward, Adam step, gradients cleared."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------- ConvVAE
def _pyvae_vae_loss(model, x):
    return model(x).loss


def _eager_vae_loss(model, x):
    """The same ConvVAE's negative ELBO with eager PyTorch for the latent and the likelihood."""
    mu, logvar = model.latent.proj(model._features(x, None)).chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    recon = torch.sigmoid(model._params(z, None))  # the decoder's output in data space, as eager models return it
    nll = F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1)
    return (nll + kl).mean()


# --------------------------------------------------------------------------- VQ-VAE
def _gaussian_recon(mean, x):
    return 0.5 * ((x - mean).pow(2) + _LOG_2PI).flatten(1).sum(1)


class _EagerEMAQuantizer(torch.nn.Module):
    """The EMA VQ layer as eager code writes it: the N x K distance matrix, argmin, per-code counts
    and sums from bincount / index_add_, Laplace smoothing, straight-through gradient."""

    def __init__(self, codebook: torch.Tensor, decay: float = 0.99, eps: float = 1e-5, beta: float = 0.25):
        super().__init__()
        self.decay, self.eps, self.beta = decay, eps, beta
        self.register_buffer("codebook", codebook.clone())
        self.register_buffer("ema_counts", torch.ones(codebook.shape[0]))
        self.register_buffer("ema_sums", codebook.clone())

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        e = self.codebook.clone()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)
        idx = dist.argmin(1)
        q = e[idx].view_as(x)
        if self.training:
            with torch.no_grad():
                k = e.shape[0]
                counts = torch.bincount(idx, minlength=k).to(flat.dtype)
                sums = torch.zeros_like(e).index_add_(0, idx, flat.detach())
                self.ema_counts.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.ema_sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                total = self.ema_counts.sum()
                smoothed = (self.ema_counts + self.eps) / (total + k * self.eps) * total
                self.codebook.copy_(self.ema_sums / smoothed.unsqueeze(1))
        loss = self.beta * F.mse_loss(x, q.detach())
        return x + (q - x).detach(), loss


def _grid_vq_loss(quantize):
    """The loss of a VQ-VAE whose quantizer maps the channel-last grid to (quantized, vq loss)."""
    def loss_fn(model, x):
        z_e = model.encoder(x)
        zq, vq_loss = quantize(z_e.permute(0, 2, 3, 1))
        return _gaussian_recon(model.decoder(zq.permute(0, 3, 1, 2)), x).mean() + vq_loss
    return loss_fn


def _vqp_model(model, num_codes: int, code_dim: int):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    m = copy.deepcopy(model)
    del m.vq
    m.vqp = VectorQuantize(dim=code_dim, codebook_size=num_codes, decay=0.99, commitment_weight=0.25,
                           rotation_trick=False).to(next(model.parameters()).device)
    with torch.no_grad():  # the same initial codebook as pyvae's
        m.vqp._codebook.embed.copy_(model.vq.codebook.unsqueeze(0))
        m.vqp._codebook.embed_avg.copy_(model.vq.codebook.unsqueeze(0))
    return m


def _vqp_quantize(model):
    def quantize(z):
        b, h, w, d = z.shape
        zq, _, loss = model.vqp(z.reshape(b, h * w, d))
        return zq.view(b, h, w, d), loss
    return quantize


# --------------------------------------------------------------------------- hierarchical VAE
def _eager_hvae_loss(model, x):
    """The same HierarchicalVAE's negative ELBO, its passes walked by the model's own methods, with
    each layer's reparameterisation, KL against its prior and the likelihood as eager PyTorch."""
    d = model._bottom_up(x)
    kls = []

    def pick(i, s, prior):
        mu, logvar = model.latents[i].proj(model._posterior_input(d, i, s)).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn_like(std)
        if prior is None:
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
        else:
            prior_mu, prior_logvar = prior
            kl = 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1)
        kls.append(kl.sum(-1))
        return z

    recon = torch.sigmoid(model._top_down(pick))
    nll = F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1)
    return (nll + torch.stack(kls).sum(0)).mean()


# --------------------------------------------------------------------------- the suite
def _same_weights(model, like):
    model.load_state_dict(like.state_dict())
    return model


def _backends(device: str) -> list[str]:
    return [b for b in pyvae.backends.available(device)
            if b != "torch" and not (b == "triton" and device == "cpu")]


def _note_steps_per_second(rows: list[Row]) -> list[Row]:
    for r in rows:
        r.note = f"{1e3 / r.median_ms:.2f} steps/s"
    return rows


def _model_case(device: str, name: str, shape: str, x: torch.Tensor, make, others, flops: int | None = None) -> list[Row]:
    """Rows of one model: ``make(backend)`` builds it; ``others(base)`` gives the comparison
    providers' steps on ``base`` (the model as built with the default backend); each pyvae backend
    trains a model with base's initial weights."""
    base = make("auto")
    steps = others(base)
    for backend in _backends(device):
        steps[f"pyvae {backend}"] = _training_step(_same_weights(make(backend), base), _pyvae_vae_loss, x)
    case = Case(f"{OP} {name}", shape, torch.float32, "step", steps, x.numel() * x.element_size(), x.numel(), flops)
    return _note_steps_per_second(time_case(case, device))


def _vqvae_others(x: torch.Tensor, k: int, d: int):
    def others(base):
        eager = copy.deepcopy(base)
        eager.vq = _EagerEMAQuantizer(base.vq.codebook)
        steps = {"eager": _training_step(eager, _grid_vq_loss(eager.vq), x)}
        vqp = _vqp_model(base, k, d)
        if vqp is not None:
            steps["vector-quantize-pytorch"] = _training_step(vqp, _grid_vq_loss(_vqp_quantize(vqp)), x)
        return steps
    return others


def run(device: str, full: bool = True, progress=None) -> list[Row]:
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    cases = shapes(device, full)
    for b, c, s, latent in cases["convvae"]:
        torch.manual_seed(0)
        x = torch.rand(b, c, s, s, generator=gen).to(device)
        rows += _model_case(
            device, "convvae", f"B={b} {c}x{s}x{s} Z={latent}", x,
            lambda backend: pyvae.models.ConvVAE((c, s, s), latent_dim=latent, backend=backend).to(device),
            lambda base: {"eager": _training_step(base, _eager_vae_loss, x)})
        if progress is not None:
            progress.update(1)
    for b, c, s, k, d in cases["vqvae"]:
        torch.manual_seed(0)
        x = torch.rand(b, c, s, s, generator=gen).to(device)
        h = (s + 3) // 4
        rows += _model_case(
            device, "vqvae", f"B={b} {c}x{s}x{s} grid={h}x{h} K={k} D={d}", x,
            lambda backend: pyvae.models.VQVAE(
                (c, s, s), num_codes=k, code_dim=d, downsample=2, likelihood="gaussian", gaussian_logvar=0.0,
                dead_code_threshold=0.0, backend=backend).to(device),
            _vqvae_others(x, k, d), flops=2 * b * h * h * k * d)
        if progress is not None:
            progress.update(1)
    for b, features, dims, width in cases["hvae"]:
        torch.manual_seed(0)
        x = torch.rand(b, features, generator=gen).to(device)
        rows += _model_case(
            device, "hvae", f"B={b} {features} Z={','.join(map(str, dims))} H={width}", x,
            lambda backend: pyvae.models.HierarchicalVAE(
                (features,), latent_dims=dims, hidden_dims=(width,), backend=backend).to(device),
            lambda base: {"eager": _training_step(base, _eager_hvae_loss, x)})
        if progress is not None:
            progress.update(1)
    return rows


def n_cases(device: str, full: bool) -> int:
    s = shapes(device, full)
    return len(s["convvae"]) + len(s["vqvae"]) + len(s["hvae"])
