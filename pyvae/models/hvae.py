"""A hierarchical VAE (Ladder VAE / NVAE style) of MLPs: a top-down stack of Gaussian latent layers,
each with a prior produced by the layers above it."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..metrics import ACTIVE_THRESHOLD, evaluating, per_example
from ..nn import GaussianLatent
from ..ops.likelihood import gaussian_nll
from ..ops.reparam_kl import reparameterize_kl
from .base import (BaseVAE, ImageGrid, ModelOutput, gaussian_latent_metrics, positive_int, traversal_latents,
                   traversal_values)
from .vae import check_activation, check_hidden_dims, mlp

_SEED_MODULUS = 2**63  # a layer's seed is seed + layer index, kept in the op's range [0, 2**63 - 1]

Prior = Optional[tuple[torch.Tensor, torch.Tensor]]


def _latent_dims(latent_dims) -> tuple[int, ...]:
    msg = "latent_dims must be a sequence of at least 2 positive ints (bottom layer first; use VAE for one layer)"
    if isinstance(latent_dims, int) and not isinstance(latent_dims, bool):
        raise ValueError(f"{msg}, got {latent_dims!r}")
    try:
        dims = tuple(latent_dims)
    except TypeError:
        raise TypeError(f"{msg}, got {type(latent_dims).__name__}") from None
    if len(dims) < 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{msg}, got {dims!r}")
    return dims


def _free_bits(free_bits, layers: int) -> tuple[float, ...]:
    msg = f"free_bits must be a number >= 0 (nats per latent dimension) or a sequence of {layers}, one per layer"
    if isinstance(free_bits, (int, float)) and not isinstance(free_bits, bool):
        values = (free_bits,) * layers
    else:
        try:
            values = tuple(free_bits)
        except TypeError:
            raise TypeError(f"{msg}, got {type(free_bits).__name__}") from None
    if len(values) != layers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                        and math.isfinite(v) for v in values):
        raise ValueError(f"{msg}, got {free_bits!r}")
    return tuple(float(v) for v in values)


def _layer_seed(seed: Optional[int], layer: int) -> Optional[int]:
    # Layers drawn with one seed would share the first elements of one noise stream.
    return None if seed is None else (seed + layer) % _SEED_MODULUS


class HierarchicalVAE(BaseVAE):
    """A hierarchical VAE with ``L = len(latent_dims) >= 2`` stochastic layers (``latent_dims``
    bottom first), Ladder-VAE / NVAE style (Sønderby et al. 2016, Vahdat & Kautz 2020), on inputs
    ``[B, *input_shape]`` (flattened inside).

    Bottom-up (deterministic): ``d_1 = encoder(x)``, the MLP ``prod(input_shape) -> hidden_dims[0]
    -> ... -> hidden_dims[-1] = H`` (Linear + activation), and ``d_i = act(Linear(d_{i-1}))`` of width H
    for ``i = 2..L``.

    Top-down: layer L's posterior ``q(z_L | x)`` is a :class:`pyvae.nn.GaussianLatent` on ``d_L``
    with the prior N(0, I). Below it, the top-down state ``s_i = act(Linear([z_{i+1}, s_{i+1}]))``
    (width H; ``s_{L-1}`` from ``z_L`` alone) gives layer i's prior ``N(mu_p, exp(logvar_p))``
    (a Linear of ``s_i``) and, with the bottom-up features, its posterior: a GaussianLatent on
    ``[d_i, s_i]`` called with ``prior=(mu_p, logvar_p)``, so the fused op samples ``z_i`` and
    computes the KL against the learned prior (and its gradients to the prior) in one pass. The
    decoder maps ``[z_1, s_1]`` through the mirrored MLP to the likelihood's parameters.

    Latents are the concatenation ``[z_1, ..., z_L]`` (``latent_dim = sum(latent_dims)``):
    ``forward``'s ``z``, what :meth:`encode` returns (every layer's posterior mean, each given the
    means of the layers above) and what :meth:`decode` takes. ``forward``'s ``kl`` is the total KL
    per example and ``kl_layers`` the ``[L, B]`` per-layer KLs ``KL(q(z_i | x, z_>i) || p(z_i | z_>i))``
    (bottom first). In eval mode every layer passes its posterior mean on (the GaussianLatent
    convention), so ``forward``'s loss is no ELBO estimate there; :meth:`negative_elbo` is.

    ``free_bits``: one floor for every layer, or a sequence of one per layer (bottom first), nats
    per latent dimension (see :class:`pyvae.nn.GaussianLatent`). ``likelihood``, ``beta``,
    ``kl_warmup_steps``, ``backend``, ``gaussian_logvar``, ``num_mix``, ``num_levels`` and
    ``activation`` (of every MLP) as in :class:`pyvae.models.VAE`.
    """

    continuous_latent = True

    def __init__(self, input_shape, *, latent_dims: Sequence[int] = (16, 8, 4), hidden_dims: Sequence[int] = (256, 128),
                 likelihood: str = "bernoulli", beta: float = 1.0, kl_warmup_steps: int = 0,
                 free_bits: Union[float, Sequence[float]] = 0.0, backend: str = "auto",
                 gaussian_logvar="learned", num_mix: int = 10, num_levels: int = 256, activation: str = "relu") -> None:
        check_activation(activation)
        dims = _latent_dims(latent_dims)
        floors = _free_bits(free_bits, len(dims))
        hidden = check_hidden_dims(hidden_dims)
        if not hidden:
            raise ValueError("hidden_dims must hold at least one width (its last is the width H of the ladder)")
        super().__init__(input_shape, likelihood=likelihood, gaussian_logvar=gaussian_logvar, beta=beta,
                         kl_warmup_steps=kl_warmup_steps, backend=backend, num_mix=num_mix, num_levels=num_levels)
        self.latent_dims, self.hidden_dims, self.free_bits = dims, hidden, floors
        self.num_layers = len(dims)
        self.latent_dim = sum(dims)
        features, width = math.prod(self.input_shape), hidden[-1]
        self.encoder = mlp((features, *hidden), activation)
        self.bottom_up = nn.ModuleList(mlp((width, width), activation) for _ in dims[1:])
        # (indices from 0, bottom first) top_down[i] maps [z_{i+1}, s_{i+1}] to s_i; priors[i] maps s_i to
        # (mu_p, logvar_p) of layer i
        self.top_down = nn.ModuleList(mlp((dims[i + 1] + (width if i + 1 < len(dims) - 1 else 0), width), activation)
                                      for i in range(len(dims) - 1))
        self.priors = nn.ModuleList(nn.Linear(width, 2 * z) for z in dims[:-1])
        self.latents = nn.ModuleList(
            GaussianLatent(width if i == len(dims) - 1 else 2 * width, z, backend=backend, free_bits=fb)
            for i, (z, fb) in enumerate(zip(dims, floors)))
        widths = (dims[0] + width, *reversed(hidden))
        self.decoder = nn.Sequential(mlp(widths, activation), nn.Linear(widths[-1], math.prod(self.param_shape)))

    # ------------------------------------------------------------------ the two passes
    def _bottom_up(self, x: torch.Tensor, repeat: int = 1) -> list[torch.Tensor]:
        """Features ``d_1 .. d_L``, each ``[repeat * B, H]`` (rows repeated ``repeat`` times, whole
        batch after whole batch)."""
        d = [self.encoder(x.flatten(1))]
        for block in self.bottom_up:
            d.append(block(d[-1]))
        if repeat > 1:
            d = [f.expand(repeat, *f.shape).reshape(-1, f.shape[-1]) for f in d]
        return d

    def _top_down(self, pick: Callable[[int, Optional[torch.Tensor], Prior], torch.Tensor]) -> torch.Tensor:
        """Walks the layers from the top: ``pick(i, s_i, prior_i) -> z_i`` chooses layer i's latent
        given its top-down state (None at the top) and prior ``(mu_p, logvar_p)`` (None at the top:
        N(0, I)). Returns the decoder's output, the likelihood's parameters ``[N, *param_shape]``."""
        s = None
        for i in reversed(range(self.num_layers)):
            prior = None if s is None else self.priors[i](s).chunk(2, dim=-1)
            z = pick(i, s, prior)
            if i > 0:
                s = self.top_down[i - 1](z if s is None else torch.cat([z, s], dim=-1))
        h = torch.cat([z, s], dim=-1)
        return self.decoder(h).view(h.shape[0], *self.param_shape)

    def _posterior_input(self, d: list[torch.Tensor], i: int, s: Optional[torch.Tensor]) -> torch.Tensor:
        return d[i] if s is None else torch.cat([d[i], s], dim=-1)

    def _draws(self, x: torch.Tensor, k: int, seed: Optional[int], log_ratio: bool):
        """One ancestral posterior draw ``z_L, ..., z_1`` for each row of ``x`` repeated ``k`` times
        (the bottom layer's noise from ``seed``, the next one's from ``seed + 1``, ...). Returns the likelihood's parameters ``[k B, ...]``,
        the per-layer KLs ``[L, k B]`` and, with ``log_ratio``, ``sum_i log p(z_i | z_>i) -
        log q(z_i | x, z_>i)`` ``[k B]`` (the Gaussians' log(2 pi) constants cancel)."""
        d = self._bottom_up(x, k)
        kls: list[Optional[torch.Tensor]] = [None] * self.num_layers
        ratios: list[torch.Tensor] = []

        def pick(i, s, prior):
            # A fixed seed: the layer's own draw (unused) then takes nothing from PyTorch's generator.
            post = self.latents[i](self._posterior_input(d, i, s), prior=prior, seed=0)
            prior_mu, prior_logvar = (None, None) if prior is None else prior
            z, kls[i] = reparameterize_kl(post.mu, post.logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                          seed=_layer_seed(seed, i), backend=self.backend)
            if log_ratio:
                log_q = -gaussian_nll(post.mu, z, post.logvar, full=False, reduction="per_sample",
                                      backend=self.backend)
                log_p = -gaussian_nll(torch.zeros_like(z) if prior_mu is None else prior_mu, z, prior_logvar,
                                      full=False, reduction="per_sample", backend=self.backend)
                ratios.append(log_p - log_q)
            return z

        params = self._top_down(pick)
        return params, torch.stack(kls), (torch.stack(ratios).sum(0) if log_ratio else None)

    # ------------------------------------------------------------------ the objective
    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> ModelOutput:
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        d = self._bottom_up(x)
        posts = [None] * self.num_layers

        def pick(i, s, prior):
            posts[i] = self.latents[i](self._posterior_input(d, i, s), prior=prior)
            return posts[i].z

        params = self._top_down(pick)
        recon_loss = self._recon_nll(params, x)
        kl_layers = torch.stack([p.kl for p in posts])
        kl_loss = torch.stack([p.kl_loss for p in posts]).sum(0)
        beta = self.beta if self.kl_warmup_steps == 0 else self.current_beta()
        loss = (recon_loss + beta * kl_loss).mean()
        self._advance_schedule()
        z = torch.cat([p.z for p in posts], dim=-1)
        return ModelOutput(loss, recon_loss, kl_layers.sum(0), self._recon(params), z, kl_layers=kl_layers)

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                   seed: Optional[int] = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(recon_nll [B], kl_layers [L, B])`` of one ancestral posterior draw made with ``seed``
        (None: from PyTorch's generator): the terms whose sum is :meth:`negative_elbo`."""
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        params, kl_layers, _ = self._draws(x, 1, seed, log_ratio=False)
        return self._recon_nll(params, x), kl_layers

    @torch.no_grad()
    def negative_elbo(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                      seed: Optional[int] = 0) -> torch.Tensor:
        """``[B]`` per-example negative ELBO ``-log p(x|z_1, s_1) + sum_i KL_i`` with one ancestral
        posterior draw (the bottom layer's noise from ``seed``, the next one's from ``seed + 1``, ...;
        None: from PyTorch's generator), every KL against the prior its layers above give for that
        draw; beta = 1, no free bits."""
        recon, kl_layers = self.elbo_terms(x, y, seed=seed)
        return recon + kl_layers.sum(0)

    @torch.no_grad()
    def log_importance_weights(self, x: torch.Tensor, k: int, y: Optional[torch.Tensor] = None, *,
                               seed: Optional[int] = None) -> torch.Tensor:
        """``[k, B]``: ``log p(x|z) + log p(z) - log q(z|x)`` for ``k`` ancestral draws of
        ``z = (z_1, ..., z_L)`` per example, ``log p(z) = sum_i log p(z_i | z_>i)`` and ``log q(z|x)
        = sum_i log q(z_i | x, z_>i)``: the batch repeated ``k`` times, drawn and decoded as one."""
        positive_int("k", k)
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        params, _, log_ratio = self._draws(x, k, seed, log_ratio=True)
        x_k = x.expand(k, *x.shape).reshape(k * x.shape[0], *self.input_shape)
        return (log_ratio - self._recon_nll(params, x_k)).view(k, x.shape[0])

    # ------------------------------------------------------------------ the method set
    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, sum(latent_dims)]``: every layer's posterior mean (bottom first), layer i's given the
        means of the layers above it."""
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        d = self._bottom_up(x)
        means = [None] * self.num_layers

        def pick(i, s, prior):
            means[i] = self.latents[i](self._posterior_input(d, i, s), prior=prior, seed=0).mu
            return means[i]

        self._top_down(pick)
        return torch.cat(means, dim=-1)

    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Data-space means ``[N, *input_shape]`` of ``p(x | z_1, s_1)`` for latents ``[N,
        sum(latent_dims)]`` laid out as :meth:`encode` returns them (the top-down states are
        recomputed from ``z_2 .. z_L``)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape [N, sum(latent_dims) = {self.latent_dim}] (layers "
                             f"{list(self.latent_dims)} concatenated, bottom first), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        self._check_y(y, z.shape[0], z.device)
        parts = z.split(self.latent_dims, dim=1)
        return self._to_data(self._top_down(lambda i, s, prior: parts[i]))

    @torch.no_grad()
    def sample(self, n: int, y=None, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` ancestral draws, ``z_L ~ N(0, I)``, then ``z_i ~ p(z_i | z_>i)`` down to ``z_1``,
        decoded to data space ``[n, *input_shape]`` (the likelihood's mean, or with ``likelihood="dmol"``
        a draw from it). With ``generator``, the layers' noise comes from ``L`` seeds drawn from it
        (``torch.randint(0, 2**62, (L,))``, bottom layer first, then the pixels' seed); without, from
        PyTorch's generator."""
        positive_int("n", n)
        ref = self.priors[0].weight
        self._check_y(y, n, ref.device)
        seeds = [None] * self.num_layers
        if generator is not None:
            seeds = torch.randint(0, 2**62, (self.num_layers,), generator=generator, device=generator.device).tolist()

        def pick(i, s, prior):
            if prior is None:
                zeros = torch.zeros(n, self.latent_dims[i], device=ref.device, dtype=ref.dtype)
                prior = (zeros, zeros)
            return reparameterize_kl(prior[0], prior[1], seed=seeds[i], backend=self.backend)[0]

        return self._draw(self._top_down(pick), generator)

    def decode_top(self, z_top: torch.Tensor) -> torch.Tensor:
        """Data-space means ``[N, *input_shape]`` decoded from top-layer latents ``[N,
        latent_dims[-1]]`` with every lower layer at its prior mean, ``z_i = mu_p(z_>i)``: what
        the top layer alone says (e.g. for a latent traversal)."""
        top = self.latent_dims[-1]
        if not isinstance(z_top, torch.Tensor) or z_top.dim() != 2 or z_top.shape[1] != top:
            raise ValueError(f"z_top must have shape [N, latent_dims[-1] = {top}], got "
                             f"{tuple(z_top.shape) if isinstance(z_top, torch.Tensor) else type(z_top).__name__}")
        return self._to_data(self._top_down(lambda i, s, prior: z_top if prior is None else prior[0]))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                           x_train: Optional[torch.Tensor] = None, iwae_k: int = 100,
                           seed: Optional[int] = 0) -> dict[str, Any]:
        """:meth:`BaseVAE.evaluation_metrics`: ``test_negative_elbo``, ``test_kl`` and
        ``test_kl_layers`` (the mean total and per-layer KLs, bottom first, of the draw that
        :meth:`negative_elbo` makes: each layer's KL depends on the draw above it),
        ``test_recon_nll`` (the negative ELBO less the KL), the latent's numbers over all layers
        (:func:`pyvae.models.base.gaussian_latent_metrics`), ``latent_dims`` and
        ``active_units_layers`` (active units per layer)."""
        result = super().evaluation_metrics(x, y, x_train=x_train, iwae_k=iwae_k, seed=seed)
        with evaluating(self):
            kl_layers = per_example(lambda xb, yb: self.elbo_terms(xb, yb)[1].T, x, y).double()
        result["test_kl"] = float(kl_layers.sum(1).mean())
        result["test_kl_layers"] = kl_layers.mean(0).tolist()
        result["test_recon_nll"] = result["test_negative_elbo"] - result["test_kl"]
        latent, variances = gaussian_latent_metrics(self, x, y, iwae_k=iwae_k, seed=seed)
        return {**result, **latent, "latent_dims": list(self.latent_dims),
                "active_units_layers": [int((v > ACTIVE_THRESHOLD).sum()) for v in variances.split(self.latent_dims)]}

    @torch.no_grad()
    def latent_traversal(self, variances: torch.Tensor, *, threshold: float = ACTIVE_THRESHOLD) -> ImageGrid:
        """The top layer's traversal, the layer whose prior is N(0, I): a row per most active unit
        of it (:func:`pyvae.models.base.traversal_latents` of the top layer's part of the
        posterior-mean ``variances`` ``[sum(latent_dims)]``), that unit from -3 to 3 and the others
        at 0, decoded by :meth:`decode_top` (the layers below at their prior means)."""
        width = self.latent_dims[-1]
        values = traversal_values(self.step.device)
        z = traversal_latents(variances[-width:], values, threshold=threshold)
        title = (f"top-layer traversal: {len(z) // len(values)} most active of its {width} dimensions, -3..3 "
                 "around 0\n(the layers below at their prior means)")
        return ImageGrid(self.decode_top(z), len(values), title)

    def extra_repr(self) -> str:
        return f"latent_dims={self.latent_dims}, free_bits={self.free_bits}, beta={self.beta}"
