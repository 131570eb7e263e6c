"""Gaussian-latent VAEs: VAE (MLP), ConvVAE (convolutional), CVAE (class-conditional MLP)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..metrics import ACTIVE_THRESHOLD, evaluating, per_example
from ..nn import GaussianLatent
from ..ops.likelihood import gaussian_nll
from ..ops.reparam_kl import reparameterize_kl
from ._conv import check_channels, conv_decoder, conv_encoder
from .base import (BaseVAE, ImageGrid, ModelOutput, gaussian_latent_metrics, positive_int, positive_ints,
                   traversal_latents, traversal_values)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear + activation between consecutive sizes (the MLP blocks of the VAE family)."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return activation


def check_hidden_dims(hidden_dims) -> tuple[int, ...]:
    return positive_ints("hidden_dims", hidden_dims, allow_empty=True)


class GaussianVAE(BaseVAE):
    """A VAE with a Gaussian posterior ``q(z|x) = N(mu, diag(exp(logvar)))`` and a N(0, I) prior.

    A subclass builds ``self.latent`` (a :class:`pyvae.nn.GaussianLatent`) and provides
    ``_features(x, y) -> h`` (the encoder up to the latent layer) and ``_params(z, y)`` (the decoder:
    the likelihood's parameters, ``[N, *input_shape]``).

    ``forward`` in training mode samples ``z`` (fused reparameterisation + KL) and returns
    ``loss = mean(recon_loss + beta_t * kl_loss)`` where ``kl_loss`` is the KL with the free-bits
    floor; in eval mode ``z`` is the posterior mean (the layer's convention), so its ``loss`` is not an
    ELBO estimate; :meth:`negative_elbo` is.
    """

    latent: GaussianLatent
    continuous_latent = True

    def _features(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _params(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> ModelOutput:
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        post = self.latent(self._features(x, y))
        params = self._params(post.z, y)
        recon_loss = self._recon_nll(params, x)
        beta = self.beta if self.kl_warmup_steps == 0 else self.current_beta()
        loss = (recon_loss + beta * post.kl_loss).mean()
        self._advance_schedule()
        return ModelOutput(loss, recon_loss, post.kl, self._recon(params), post.z)

    def _posterior(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        # A fixed seed: the layer's own draw (unused here) then takes nothing from PyTorch's generator.
        post = self.latent(self._features(x, y), seed=0)
        return post.mu, post.logvar

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The posterior mean ``mu`` ``[B, latent_dim]``."""
        return self._posterior(x, y)[0]

    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Data-space means ``[N, *input_shape]`` of ``p(x|z)``: probabilities (Bernoulli), the
        continuous-Bernoulli mean, or the Gaussian mean."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape [N, latent_dim = {self.latent_dim}], got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        self._check_y(y, z.shape[0], z.device)
        return self._to_data(self._params(z, y))

    @torch.no_grad()
    def sample(self, n: int, y=None, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` draws decoded from the prior, ``z ~ N(0, I)``, in data space ``[n, *input_shape]``:
        the likelihood's mean, or with ``likelihood="dmol"`` a draw from it (see
        :class:`pyvae.models.BaseVAE`). ``y``: labels ``[n]`` or one int for all (conditional models)."""
        positive_int("n", n)
        ref = self.latent.proj.weight
        y = self._labels(y, n, ref.device)
        z = torch.randn(n, self.latent_dim, generator=generator, device=ref.device, dtype=ref.dtype)
        return self._draw(self._params(z, y), generator)

    @torch.no_grad()
    def negative_elbo(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, seed: Optional[int] = 0) -> torch.Tensor:
        """``[B]`` per-example negative ELBO ``-log p(x|z) + KL(q(z|x) || p(z))`` with one posterior
        sample ``z`` drawn with ``seed`` (None: from PyTorch's generator), beta = 1, no free bits."""
        mu, logvar = self._posterior(x, y)
        z, kl = reparameterize_kl(mu, logvar, seed=seed, backend=self.backend)
        return self._recon_nll(self._params(z, y), x) + kl

    @torch.no_grad()
    def log_importance_weights(self, x: torch.Tensor, k: int, y: Optional[torch.Tensor] = None, *,
                               seed: Optional[int] = None) -> torch.Tensor:
        """``[k, B]``: ``log p(x|z_i) + log p(z_i) - log q(z_i|x)`` for ``k`` draws ``z_i ~ q(z|x)``
        per example, all drawn and decoded in one batch of ``k * B``."""
        positive_int("k", k)
        mu, logvar = self._posterior(x, y)
        b, d = mu.shape
        z, _ = reparameterize_kl(mu, logvar, n_samples=k, seed=seed, backend=self.backend)
        z = z.reshape(k * b, d)
        ys = None if y is None else y.repeat(k)
        x_k = x.expand(k, *x.shape).reshape(k * b, *self.input_shape)
        log_px = -self._recon_nll(self._params(z, ys), x_k)
        # log p(z) - log q(z|x) as Gaussian NLLs of z; their log(2 pi) constants cancel (full=False).
        mu_k = mu.expand(k, b, d).reshape(k * b, d)
        logvar_k = logvar.expand(k, b, d).reshape(k * b, d)
        log_q = -gaussian_nll(mu_k, z, logvar_k, full=False, reduction="per_sample", backend=self.backend)
        log_p = -gaussian_nll(torch.zeros_like(z), z, None, full=False, reduction="per_sample", backend=self.backend)
        return (log_px + log_p - log_q).view(k, b)

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                           x_train: Optional[torch.Tensor] = None, iwae_k: int = 100,
                           seed: Optional[int] = 0) -> dict[str, Any]:
        """:meth:`BaseVAE.evaluation_metrics`: ``test_negative_elbo``, ``test_kl`` (the mean
        ``KL(q(z|x) || p(z))``), ``test_recon_nll`` (the negative ELBO less that KL), then the
        latent's numbers (:func:`pyvae.models.base.gaussian_latent_metrics`: the importance-weighted
        bound, active units, ``latent_dim``, ``latent_variances``)."""
        result = super().evaluation_metrics(x, y, x_train=x_train, iwae_k=iwae_k, seed=seed)
        with evaluating(self):
            kl = per_example(lambda xb, yb: self(xb, yb).kl, x, y)
        result["test_kl"] = float(kl.double().mean())
        result["test_recon_nll"] = result["test_negative_elbo"] - result["test_kl"]
        return {**result, **gaussian_latent_metrics(self, x, y, iwae_k=iwae_k, seed=seed)[0]}

    @torch.no_grad()
    def latent_traversal(self, variances: torch.Tensor, *, threshold: float = ACTIVE_THRESHOLD) -> ImageGrid:
        """A row per most active unit (:func:`pyvae.models.base.traversal_latents` of the units'
        posterior-mean ``variances`` ``[latent_dim]``), that unit from -3 to 3 and the others at 0,
        decoded (a conditional model as class 0)."""
        values = traversal_values(self.step.device)
        z = traversal_latents(variances, values, threshold=threshold)
        y = torch.zeros(len(z), dtype=torch.int64, device=z.device) if self.conditional else None
        title = f"latent traversal: {len(z) // len(values)} most active dimensions, -3..3 around 0"
        return ImageGrid(self.decode(z, y), len(values), title + (" (class 0)" if self.conditional else ""))


class _MLPVAE(GaussianVAE):
    """MLP encoder and decoder on flattened inputs; with ``num_classes``, a one-hot label is
    concatenated to the encoder's input and to z at the decoder's input."""

    def __init__(self, input_shape, num_classes: Optional[int], latent_dim: int, hidden_dims, likelihood: str,
                 beta: float, kl_warmup_steps: int, free_bits: float, backend: str, gaussian_logvar, num_mix: int,
                 num_levels: int, activation: str) -> None:
        check_activation(activation)
        super().__init__(input_shape, likelihood=likelihood, gaussian_logvar=gaussian_logvar, beta=beta,
                         kl_warmup_steps=kl_warmup_steps, free_bits=free_bits, backend=backend, num_mix=num_mix,
                         num_levels=num_levels)
        self.num_classes = num_classes
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.hidden_dims = check_hidden_dims(hidden_dims)
        cond = num_classes or 0
        features = math.prod(self.input_shape)
        self.encoder = mlp((features + cond, *self.hidden_dims), activation)
        self.latent = GaussianLatent(self.hidden_dims[-1] if self.hidden_dims else features + cond, latent_dim,
                                     backend=backend, free_bits=free_bits)
        widths = (latent_dim + cond, *reversed(self.hidden_dims))
        self.decoder = nn.Sequential(mlp(widths, activation), nn.Linear(widths[-1], math.prod(self.param_shape)))

    def _one_hot(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # A comparison, not F.one_hot, whose range check reads the labels back to the host.
        return (y.unsqueeze(1) == torch.arange(self.num_classes, device=y.device)).to(dtype)

    def _features(self, x, y):
        h = x.flatten(1)
        if self.num_classes is not None:
            h = torch.cat([h, self._one_hot(y, h.dtype)], dim=1)
        return self.encoder(h)

    def _params(self, z, y):
        if self.num_classes is not None:
            z = torch.cat([z, self._one_hot(y, z.dtype)], dim=1)
        return self.decoder(z).view(z.shape[0], *self.param_shape)


class VAE(_MLPVAE):
    """A VAE with MLP encoder and decoder on inputs ``[B, *input_shape]`` (flattened inside).

    Encoder ``prod(input_shape) -> hidden_dims[0] -> ... -> hidden_dims[-1]`` (Linear + ``activation``:
    ``"relu"``, ``"elu"``, ``"gelu"`` or ``"silu"``), then
    a :class:`pyvae.nn.GaussianLatent` to ``latent_dim``; decoder the mirror, ending in a Linear to
    the likelihood's parameters. ``likelihood``: ``"bernoulli"``, ``"continuous_bernoulli"`` or
    ``"gaussian"`` (variance from ``gaussian_logvar``: ``"learned"`` (one scalar; per channel for
    ``(C, H, W)`` shapes), ``"optimal"`` or a fixed float) or ``"dmol"`` (a discretized mixture of
    ``num_mix`` logistics per pixel for data on ``num_levels`` levels). ``beta``, ``kl_warmup_steps`` and
    ``free_bits`` shape the objective (see :class:`pyvae.models.BaseVAE`); ``backend`` goes to the ops.
    """

    def __init__(self, input_shape, *, latent_dim: int = 16, hidden_dims: Sequence[int] = (256, 128),
                 likelihood: str = "bernoulli", beta: float = 1.0, kl_warmup_steps: int = 0, free_bits: float = 0.0,
                 backend: str = "auto", gaussian_logvar="learned", num_mix: int = 10, num_levels: int = 256,
                 activation: str = "relu") -> None:
        super().__init__(input_shape, None, latent_dim, hidden_dims, likelihood, beta, kl_warmup_steps, free_bits,
                         backend, gaussian_logvar, num_mix, num_levels, activation)


class CVAE(_MLPVAE):
    """A conditional VAE (Sohn et al. 2015): :class:`VAE`'s MLPs with a one-hot class label
    concatenated to the encoder's input and to z at the decoder's input, so both ``q(z|x, y)`` and
    ``p(x|z, y)`` see it. Every method takes ``y``: int64 labels ``[B]`` in ``[0, num_classes)``
    (required; ``sample`` and ``interpolate`` also take one int for all)."""

    conditional = True

    def __init__(self, input_shape, num_classes: int, *, latent_dim: int = 16, hidden_dims: Sequence[int] = (256, 128),
                 likelihood: str = "bernoulli", beta: float = 1.0, kl_warmup_steps: int = 0, free_bits: float = 0.0,
                 backend: str = "auto", gaussian_logvar="learned", num_mix: int = 10, num_levels: int = 256,
                 activation: str = "relu") -> None:
        positive_int("num_classes", num_classes)
        super().__init__(input_shape, num_classes, latent_dim, hidden_dims, likelihood, beta, kl_warmup_steps,
                         free_bits, backend, gaussian_logvar, num_mix, num_levels, activation)


class ConvVAE(GaussianVAE):
    """A convolutional VAE on images ``[B, C, H, W]`` (any H, W: 8x8 digits, 3x64x64, ...).

    Encoder: one 3x3 stride-2 convolution + ReLU per entry of ``channels`` (so H and W shrink by
    2 ** len(channels), rounding up), a Linear + ReLU to ``hidden_dim``, then a
    :class:`pyvae.nn.GaussianLatent`. Decoder: Linear + ReLU to ``hidden_dim`` and to the last
    feature map, transposed convolutions back to (H, W), and a 3x3 convolution to the likelihood's
    parameters. Other arguments as in :class:`VAE`.
    """

    def __init__(self, input_shape, *, latent_dim: int = 16, channels: Sequence[int] = (32, 64), hidden_dim: int = 256,
                 likelihood: str = "bernoulli", beta: float = 1.0, kl_warmup_steps: int = 0, free_bits: float = 0.0,
                 backend: str = "auto", gaussian_logvar="learned", num_mix: int = 10, num_levels: int = 256) -> None:
        super().__init__(input_shape, likelihood=likelihood, gaussian_logvar=gaussian_logvar, beta=beta,
                         kl_warmup_steps=kl_warmup_steps, free_bits=free_bits, backend=backend, image=True,
                         num_mix=num_mix, num_levels=num_levels)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.channels = check_channels(channels)
        self.hidden_dim = positive_int("hidden_dim", hidden_dim)
        c, h, w = self.input_shape
        strides = (2,) * len(self.channels)
        convs, sizes = conv_encoder(c, self.channels, strides, (h, w))
        self._feature_map = (self.channels[-1], *sizes[-1])
        flat = math.prod(self._feature_map)
        self.encoder = nn.Sequential(convs, nn.Flatten(), nn.Linear(flat, hidden_dim), nn.ReLU())
        self.latent = GaussianLatent(hidden_dim, latent_dim, backend=backend, free_bits=free_bits)
        self.decoder_input = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, flat),
                                           nn.ReLU())
        self.decoder = conv_decoder(self.param_shape[0], self.channels, strides, sizes)

    def _features(self, x, y):
        return self.encoder(x)

    def _params(self, z, y):
        return self.decoder(self.decoder_input(z).view(z.shape[0], *self._feature_map))
