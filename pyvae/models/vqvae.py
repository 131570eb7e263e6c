"""VQ-VAE (van den Oord et al. 2017): a convolutional encoder and decoder around
pyvae.nn.VectorQuantizer, pyvae.nn.ResidualVectorQuantizer (residual VQ, Zeghidour et al. 2021),
or pyvae.nn.FSQ (finite scalar quantization, Mentzer et al. 2023)."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..metrics import code_usage, evaluating, per_example, perplexity
from ..nn import FSQ, ResidualVectorQuantizer, VectorQuantizer
from ..ops.vq import VQResult, code_counts, perplexity_of_frequencies
from ._conv import check_channels, conv_decoder, conv_encoder
from .base import BaseVAE, ModelOutput, positive_int, positive_ints


@contextlib.contextmanager
def _eval(module: nn.Module):
    """``module`` in eval mode for the block: a quantizer then reads its codebook without an EMA step."""
    was = module.training
    module.train(False)
    try:
        yield module
    finally:
        module.train(was)


class VQVAE(BaseVAE):
    """A VQ-VAE on images ``[B, C, H, W]``.

    Encoder: one 3x3 convolution + ReLU per entry of ``channels``, the first ``downsample`` of them
    with stride 2 (the latent grid is (H, W) / 2 ** downsample, rounded up), a 3x3 convolution +
    ReLU and a 1x1 convolution to ``code_dim`` channels. The latent grid ``[B, code_dim, h, w]`` is
    quantised by a :class:`pyvae.nn.VectorQuantizer` on its channel-last view ``[B, h, w, code_dim]``
    (the op gathers its rows, one copy of the grid). Decoder: the mirror, to the likelihood's
    parameters.

    ``ema_decay`` (default 0.99; None = a codebook trained by the codebook loss) and ``beta`` (the
    commitment weight) go to the quantizer, as do ``dead_code_threshold`` (default None: 1.0 with an
    EMA codebook, i.e. a code whose EMA count falls below one row per batch is restarted at a row of
    the batch; 0 = off, the only choice for a learned codebook) and any further keyword
    (``kmeans_init``, ``kmeans_iters``, ``cosine``, ``straight_through``, ``precision``,
    ``usage_decay``, ``sync_ema``). ``loss`` is ``recon_loss.mean() + vq_loss``.

    ``quantizer="fsq"``: the latent grid has ``code_dim = len(levels)`` channels, each bounded and
    rounded to its number of ``levels`` by a :class:`pyvae.nn.FSQ` (no codebook, no VQ loss: the
    straight-through gradient alone trains the encoder); its implicit codebook has ``num_codes =
    prod(levels)`` codes. ``num_codes``, ``ema_decay``, ``dead_code_threshold`` and quantizer options
    belong to ``quantizer="vq"``.

    ``num_quantizers=Q`` (``quantizer="vq"``, Q > 1): residual VQ, Q codebooks of ``num_codes``
    codes in sequence (a :class:`pyvae.nn.ResidualVectorQuantizer`, all stages in one fused call),
    each stage quantising what the stages before it left; the decoder sees the sum of the Q codes.
    Indices are ``[B, h, w, Q]``, the prior's codes ``num_codes ** Q`` combinations, and
    :meth:`evaluation_metrics` reports each stage's code usage and perplexity.

    With a uniform prior over the K codes and a deterministic posterior, the KL term of the ELBO is
    ``h * w * log K`` per example (van den Oord et al. 2017, section 3.1): :meth:`negative_elbo` adds
    it to the reconstruction NLL.
    """

    def __init__(self, input_shape, *, num_codes: Optional[int] = None, code_dim: Optional[int] = None,
                 channels: Sequence[int] = (32, 64), downsample: int = 2, ema_decay: Optional[float] = 0.99,
                 beta: float = 0.25, dead_code_threshold: Optional[float] = None, likelihood: str = "bernoulli",
                 backend: str = "auto", gaussian_logvar="learned", num_mix: int = 10, num_levels: int = 256,
                 quantizer: str = "vq", levels: Sequence[int] = (8, 5, 5, 5), num_quantizers: int = 1,
                 **vq_options) -> None:
        super().__init__(input_shape, likelihood=likelihood, gaussian_logvar=gaussian_logvar, beta=beta,
                         backend=backend, image=True, num_mix=num_mix, num_levels=num_levels)
        if quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {quantizer!r}")
        self.quantizer = quantizer
        self.num_quantizers = positive_int("num_quantizers", num_quantizers)
        if quantizer == "fsq" and num_quantizers != 1:
            raise ValueError(f"num_quantizers applies to quantizer='vq' only, got {num_quantizers} with 'fsq'")
        if num_quantizers > 1 and {"cosine", "straight_through"} & set(vq_options):
            raise ValueError(f"{', '.join(sorted({'cosine', 'straight_through'} & set(vq_options)))}: not available "
                             f"with num_quantizers > 1 (the residual quantizer is plain L2 with an identity "
                             f"straight-through gradient)")
        if quantizer == "fsq":
            levels = positive_ints("levels", levels)
            if num_codes is not None or dead_code_threshold is not None or vq_options:
                given = [n for n, v in (("num_codes", num_codes), ("dead_code_threshold", dead_code_threshold))
                         if v is not None] + sorted(vq_options)
                raise ValueError(f"{', '.join(given)}: options of quantizer='vq' only (FSQ's codes are the "
                                 f"combinations of its levels)")
            if code_dim is not None and code_dim != len(levels):
                raise ValueError(f"code_dim must be len(levels) = {len(levels)} with quantizer='fsq', got {code_dim!r}")
            num_codes, code_dim = math.prod(levels), len(levels)
        self.num_codes = positive_int("num_codes", 128 if num_codes is None else num_codes)
        self.code_dim = positive_int("code_dim", 16 if code_dim is None else code_dim)
        self.channels = check_channels(channels)
        if isinstance(downsample, bool) or not isinstance(downsample, int) or not 0 <= downsample <= len(self.channels):
            raise ValueError(f"downsample must be an int in [0, len(channels) = {len(self.channels)}] (the number "
                             f"of stride-2 stages), got {downsample!r}")
        self.downsample = downsample
        c, h, w = self.input_shape
        strides = tuple(2 if i < downsample else 1 for i in range(len(self.channels)))
        convs, sizes = conv_encoder(c, self.channels, strides, (h, w))
        self.latent_shape = sizes[-1]
        top = self.channels[-1]
        self.encoder = nn.Sequential(convs, nn.Conv2d(top, top, 3, padding=1), nn.ReLU(), nn.Conv2d(top, self.code_dim, 1))
        self.decoder = nn.Sequential(nn.Conv2d(self.code_dim, top, 3, padding=1), nn.ReLU(),
                                     conv_decoder(self.param_shape[0], self.channels, strides, sizes))
        if quantizer == "fsq":
            self.vq = FSQ(levels, backend=backend)
            return
        if dead_code_threshold is None:
            dead_code_threshold = 0.0 if ema_decay is None else 1.0
        if num_quantizers > 1:
            self.vq = ResidualVectorQuantizer(self.num_codes, self.code_dim, num_quantizers, beta=beta,
                                              ema_decay=ema_decay, backend=backend,
                                              dead_code_threshold=dead_code_threshold, **vq_options)
            return
        self.vq = VectorQuantizer(self.num_codes, self.code_dim, beta=beta, ema_decay=ema_decay, backend=backend,
                                  dead_code_threshold=dead_code_threshold, **vq_options)

    def _quantize(self, z_e: torch.Tensor) -> tuple[VQResult, torch.Tensor]:
        """The quantizer's result on the channel-last view, and the quantized grid ``[B, D, h, w]``.
        FSQ's is put in the same form: its int32 indices as int64, its loss terms 0 (it has none)."""
        if self.quantizer == "fsq":
            zq, indices = self.vq(z_e)
            indices = indices.long()
            counts = code_counts(indices.flatten(), self.num_codes)
            zero = torch.zeros((), dtype=torch.float32, device=z_e.device)
            perplexity = perplexity_of_frequencies(counts.float() / max(indices.numel(), 1)).float()
            return VQResult(zq.permute(0, 2, 3, 1), indices, zero, zero, zero, counts, perplexity), zq
        result = self.vq(z_e.permute(0, 2, 3, 1))
        return result, result.quantized.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> ModelOutput:
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        result, zq = self._quantize(self.encoder(x))
        params = self.decoder(zq)
        recon_loss = self._recon_nll(params, x)
        loss = recon_loss.mean() + result.loss
        self._advance_schedule()
        # a residual quantizer's perplexity is per stage: the output carries the first stage's
        perplexity = result.perplexity[0] if result.perplexity.dim() else result.perplexity
        return ModelOutput(loss, recon_loss, None, self._recon(params), zq, result.loss, result.indices, perplexity)

    def _encode(self, x: torch.Tensor, y) -> tuple[torch.Tensor, VQResult, torch.Tensor]:
        self._check_x(x)
        self._check_y(y, x.shape[0], x.device)
        z_e = self.encoder(x)
        with _eval(self.vq):
            result, zq = self._quantize(z_e)
        return z_e, result, zq

    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The quantized latents ``[B, code_dim, h, w]`` (the codebook is not updated)."""
        return self._encode(x, y)[2]

    def encode_indices(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The code indices ``[B, h, w]`` (int64) of ``x``; ``[B, h, w, Q]`` with ``num_quantizers = Q > 1``."""
        return self._encode(x, y)[1].indices

    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Data-space means ``[N, *input_shape]`` decoded from latents ``[N, code_dim, h, w]`` (taken
        as they are: quantized or not)."""
        expected = (self.code_dim, *self.latent_shape)
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"z must have shape [N, {', '.join(map(str, expected))}] (code_dim, h, w), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        self._check_y(y, z.shape[0], z.device)
        return self._to_data(self.decoder(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Data-space means ``[N, *input_shape]`` of the code grid ``indices`` ``[N, h, w]``
        (``[N, h, w, Q]`` with ``num_quantizers = Q > 1``)."""
        grid = (*self.latent_shape, *((self.num_quantizers,) if self.num_quantizers > 1 else ()))
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1 + len(grid) \
                or tuple(indices.shape[1:]) != grid:
            raise ValueError(f"indices must be int64 [N, {', '.join(map(str, grid))}], got "
                             f"{getattr(indices, 'dtype', type(indices).__name__)} "
                             f"{tuple(getattr(indices, 'shape', ()))}")
        if self.quantizer == "fsq":
            return self.decode(self.vq.indices_to_codes(indices).to(self.decoder[0].weight.dtype))
        if self.num_quantizers > 1:
            return self.decode(self.vq.get_output_from_indices(indices).permute(0, 3, 1, 2))
        codes = self.vq._normalize(nn.functional.embedding(indices, self.vq.codebook))  # unit codes if cosine
        return self.decode(codes.permute(0, 3, 1, 2))

    @torch.no_grad()
    def sample(self, n: int, y=None, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` images decoded from code grids whose codes are drawn independently from the
        quantizer's recent code usage (its ``usage`` buffer, each stage's for a residual quantizer;
        uniform without one, before any training step, and for FSQ). A VQ-VAE has no learned prior:
        a PixelCNN over the indices would give coherent samples, these show what the codes decode to."""
        positive_int("n", n)
        device = self.decoder[0].weight.device
        self._check_y(y, n, device)
        h, w = self.latent_shape
        stages = list(self.vq.stages) if self.num_quantizers > 1 else [self.vq]
        if len(stages) < self.num_quantizers:  # one shared codebook serves every stage
            stages = stages * self.num_quantizers
        drawn = []
        for stage in stages:
            probs = torch.ones(self.num_codes, device=device)
            usage = getattr(stage, "usage", None)
            if isinstance(usage, torch.Tensor):
                probs = torch.where(usage.sum() > 0, usage.float().clamp_min(0), probs)
            drawn.append(torch.multinomial(probs, n * h * w, replacement=True, generator=generator).view(n, h, w))
        return self.decode_indices(torch.stack(drawn, -1) if self.num_quantizers > 1 else drawn[0])

    def _vq_weight(self) -> float:
        # The layer's loss per element of the latent grid: beta * commitment with an EMA codebook,
        # codebook + beta * commitment (equal values) without one; FSQ has none.
        if self.quantizer == "fsq":
            return 0.0
        return self.vq.beta if self.vq.ema_decay is not None else 1.0 + self.vq.beta

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, seed: Optional[int] = 0) -> torch.Tensor:
        """``[B]`` reconstruction NLL plus each example's VQ loss term (its mean squared distance to
        its codes times the layer's weight: the batch mean of these is the layer's loss). Deterministic;
        ``seed`` is accepted for the common signature."""
        z_e, result, zq = self._encode(x, y)
        nll = self._recon_nll(self.decoder(zq), x)
        z_e = z_e.permute(0, 2, 3, 1)
        if self.num_quantizers > 1:
            # every stage's term: the mean square of the residual it leaves
            codes = self.vq.get_codes_from_indices(result.indices).to(z_e.dtype)
            residuals = z_e - codes.cumsum(0)  # [Q, B, h, w, D]
            return nll + self._vq_weight() * residuals.square().flatten(2).mean(2).sum(0).float()
        if self.quantizer == "vq":
            z_e = self.vq._normalize(z_e)  # what the layer compares with its codes
        return nll + self._vq_weight() * (z_e - zq.permute(0, 2, 3, 1)).square().flatten(1).mean(1).float()

    @torch.no_grad()
    def negative_elbo(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, seed: Optional[int] = 0) -> torch.Tensor:
        """``[B]`` reconstruction NLL + ``h * w * log(num_codes)`` (the KL of the deterministic
        posterior from a uniform prior over codes). Deterministic; ``seed`` is accepted for the
        common signature."""
        _, _, zq = self._encode(x, y)
        return self._recon_nll(self.decoder(zq), x) + self.fixed_kl

    @property
    def fixed_kl(self) -> float:
        """``h * w * Q * log(num_codes)``: the KL of the deterministic posterior from a uniform prior
        over the codes (of each of the Q stages), the same for every input."""
        return math.prod(self.latent_shape) * self.num_quantizers * math.log(self.num_codes)

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                           x_train: Optional[torch.Tensor] = None, iwae_k: int = 100,
                           seed: Optional[int] = 0) -> dict[str, Any]:
        """:meth:`BaseVAE.evaluation_metrics`: ``test_negative_elbo``, ``test_recon_nll`` (the
        negative ELBO less :attr:`fixed_kl`, from ``forward``), ``num_codes``, ``latent_grid``
        (h, w), ``num_quantizers``, and on ``x`` ``code_usage`` (the fraction of codes used),
        ``codes_used``, ``perplexity`` and ``code_counts`` (uses per code); with ``x_train``,
        ``train_code_usage`` and ``train_perplexity``. With ``num_quantizers > 1`` each of these is a
        list with one entry per stage. ``iwae_k`` and ``seed`` are accepted for the common signature (the
        importance-weighted bound of a deterministic posterior is the ELBO)."""
        result = super().evaluation_metrics(x, y, x_train=x_train, iwae_k=iwae_k, seed=seed)
        with evaluating(self):
            test_idx = per_example(self.encode_indices, x, y)
            train_idx = None if x_train is None else per_example(self.encode_indices, x_train)
            recon = per_example(lambda xb, yb: self(xb, yb).recon_loss, x, y)
        k = self.num_codes
        result.update(test_recon_nll=float(recon.double().mean()), num_codes=k, latent_grid=list(self.latent_shape),
                      num_quantizers=self.num_quantizers)
        per_stage = self.num_quantizers > 1
        stages = test_idx.unbind(-1) if per_stage else [test_idx]
        train_stages = ([] if train_idx is None else train_idx.unbind(-1) if per_stage else [train_idx])

        def each(values: list):
            return values if per_stage else values[0]

        usage = [code_usage(idx, k) for idx in stages]
        result.update(code_usage=each(usage), codes_used=each([round(u * k) for u in usage]),
                      perplexity=each([float(perplexity(idx, k)) for idx in stages]))
        if train_stages:
            result.update(train_code_usage=each([code_usage(idx, k) for idx in train_stages]),
                          train_perplexity=each([float(perplexity(idx, k)) for idx in train_stages]))
        result["code_counts"] = each([torch.bincount(idx.flatten(), minlength=k).tolist() for idx in stages])
        return result

    def log_importance_weights(self, x: torch.Tensor, k: int, y: Optional[torch.Tensor] = None, *,
                               seed: Optional[int] = None) -> torch.Tensor:
        """``[k, B]``, every row ``-negative_elbo(x)``: the posterior is deterministic, so all
        importance weights are equal and the importance-weighted bound is the ELBO."""
        positive_int("k", k)
        return (-self.negative_elbo(x, y)).expand(k, x.shape[0])
