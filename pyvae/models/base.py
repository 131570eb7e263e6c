"""What every pyvae model shares: the output type, input checks, the likelihood layer, the beta
schedule, the method set built on three hooks (encode, decode, log_importance_weights), and what a
model says about itself to a trainer (the class attributes ``conditional`` and ``continuous_latent``,
``fixed_kl``, ``evaluation_metrics``, ``prior_samples``; ``latent_traversal`` where the latent is
continuous)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..metrics import ACTIVE_THRESHOLD, active_units, evaluating, iwae_nll, per_example
from ..nn import BernoulliLikelihood, ContinuousBernoulliLikelihood, DiscretizedMixLogistic, GaussianLikelihood
from ..ops.dmol import bits_per_dim

LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian", "dmol")


class ModelOutput(NamedTuple):
    """What every model's ``forward`` returns."""
    loss: torch.Tensor                         # scalar float32: the objective to minimise
    recon_loss: torch.Tensor                   # [B] float32 reconstruction NLL per example (nats)
    kl: Optional[torch.Tensor] = None          # [B] float32 true KL(q(z|x) || p(z)) (None for VQVAE)
    recon: Optional[torch.Tensor] = None       # [B, *input_shape] reconstruction in data space (detached)
    z: Optional[torch.Tensor] = None           # latent sample [B, latent_dim] (VQVAE: quantized [B, D, h, w])
    vq_loss: Optional[torch.Tensor] = None     # scalar VQ loss (VQVAE)
    indices: Optional[torch.Tensor] = None     # [B, h, w] int64 code indices (VQVAE)
    perplexity: Optional[torch.Tensor] = None  # scalar code perplexity of the batch (VQVAE)
    kl_layers: Optional[torch.Tensor] = None   # [L, B] float32 KL of each stochastic layer, bottom first (HierarchicalVAE)


class ImageGrid(NamedTuple):
    """Images to show as a grid: ``images`` ``[N, *input_shape]`` in data space, row after row of
    ``ncols``, under ``title``."""
    images: torch.Tensor
    ncols: int
    title: str


def positive_ints(name: str, value, *, allow_int: bool = False, allow_empty: bool = False) -> tuple[int, ...]:
    """``value`` (a sequence of positive ints; one int too with ``allow_int``) as a tuple, or a
    TypeError / ValueError naming ``name``."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        ints = tuple(value)
    except TypeError:
        kind = "an int or a sequence of ints" if allow_int else "a sequence of ints"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}") from None
    if (not ints and not allow_empty) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}sequence of positive ints, got {ints!r}")
    return ints


def as_shape(name: str, shape: Union[int, Sequence[int]]) -> tuple[int, ...]:
    return positive_ints(name, shape, allow_int=True)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def make_likelihood(likelihood: str, gaussian_logvar: Union[str, float, None], input_shape: tuple[int, ...],
                    backend: str, num_mix: int = 10, num_levels: int = 256) -> nn.Module:
    """The likelihood layer with per-example reduction; a learned Gaussian variance is one per
    channel for image shapes ``(C, H, W)`` and one overall otherwise; ``"dmol"``, the discretized
    mixture of ``num_mix`` logistics on ``num_levels`` levels, needs ``input_shape`` ``(C,
    *positions)`` with C = 1 or 3."""
    if likelihood == "bernoulli":
        return BernoulliLikelihood(reduction="per_sample", backend=backend)
    if likelihood == "continuous_bernoulli":
        return ContinuousBernoulliLikelihood(reduction="per_sample", backend=backend)
    if likelihood == "gaussian":
        logvar_shape = (input_shape[0], 1, 1) if len(input_shape) == 3 else ()
        return GaussianLikelihood(gaussian_logvar, logvar_shape, reduction="per_sample", backend=backend)
    if likelihood == "dmol":
        if len(input_shape) < 2 or input_shape[0] not in (1, 3):
            raise ValueError(f"likelihood='dmol' needs input_shape (C, *positions) with C = 1 or 3 channels, got "
                             f"{input_shape}")
        return DiscretizedMixLogistic(num_mix, input_shape[0], num_levels, reduction="per_sample", backend=backend)
    raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the continuous Bernoulli with ``lambda = sigmoid(l)``: ``1 / (1 - e^-l) - 1 / l``.

    The two terms cancel near ``l = 0`` (``lambda = 0.5``), so there the series
    ``1/2 + l/12 - l^3/720 + l^5/30240 - l^7/1209600`` (from the Bernoulli numbers) is used, for
    ``|l| < 1`` in float32 (truncation error below 2.1e-8 |l|^9) and ``|l| < 0.05`` in float64.
    Computed in float32 (float64 for float64 logits); returned in the dtype of ``logits``.
    """
    l = logits.to(torch.promote_types(logits.dtype, torch.float32))
    near = l.abs() < (0.05 if l.dtype == torch.float64 else 1.0)
    safe = torch.where(near, torch.ones_like(l), l)
    direct = -1.0 / torch.expm1(-safe) - 1.0 / safe
    s = l * l
    series = 0.5 + l * (1.0 / 12.0 + s * (-1.0 / 720.0 + s * (1.0 / 30240.0 - s / 1209600.0)))
    return torch.where(near, series, direct).to(logits.dtype)


def gaussian_latent_metrics(model: "BaseVAE", x: torch.Tensor, y: Optional[torch.Tensor], *, iwae_k: int,
                            seed: Optional[int]) -> tuple[dict[str, Any], torch.Tensor]:
    """The numbers of a continuous latent on the examples ``x``: ``iwae_nll_k<iwae_k>`` (the mean
    importance-weighted bound, :func:`pyvae.metrics.iwae_nll` with ``seed``), ``active_units``,
    ``latent_dim`` and ``latent_variances`` (each unit's posterior-mean variance, rounded to 6
    places); returned with the unrounded variances ``[latent_dim]``."""
    iwae = iwae_nll(model, x, k=iwae_k, y=y, seed=seed)
    count, variances = active_units(model, x, ACTIVE_THRESHOLD, y=y, return_variances=True)
    return {f"iwae_nll_k{iwae_k}": float(iwae.double().mean()), "active_units": count,
            "latent_dim": model.latent_dim, "latent_variances": [round(v, 6) for v in variances.tolist()]}, variances


def traversal_latents(variances: torch.Tensor, values: torch.Tensor, *, threshold: float = ACTIVE_THRESHOLD,
                      most: int = 8) -> torch.Tensor:
    """Latents ``[rows * len(values), len(variances)]`` that vary one unit at a time: a row per unit
    among the ``most`` with the largest ``variances`` above ``threshold`` (the two largest when none
    is), that unit taking ``values`` in turn and every other unit 0. On the device of ``values``."""
    order = variances.argsort(descending=True).tolist()
    units = [u for u in order if variances[u] > threshold][:most] or order[:2]
    z = values.new_zeros(len(units), len(values), len(variances))
    for row, u in enumerate(units):
        z[row, :, u] = values
    return z.reshape(-1, len(variances))


def traversal_values(device: torch.device) -> torch.Tensor:
    """The values a latent traversal gives a unit: -3 to 3 in 9 steps (the prior's +-3 sigma)."""
    return torch.linspace(-3, 3, 9, device=device)


class BaseVAE(nn.Module):
    """The shared API of pyvae's models (see :mod:`pyvae.models`).

    A subclass builds its networks and provides ``forward``, ``encode``, ``decode``, ``sample``,
    ``negative_elbo`` and ``log_importance_weights``; this class holds the input checks, the
    likelihood, the beta schedule and the methods derived from those (``reconstruct``,
    ``interpolate``, ``anomaly_score``).

    ``image=True`` (for subclasses) requires ``input_shape`` to be ``(C, H, W)``.

    ``likelihood="dmol"``: the decoder outputs the parameters of a discretized mixture of
    ``num_mix`` logistics (:class:`pyvae.nn.DiscretizedMixLogistic`) per pixel, ``param_shape =
    (num_mix * (1 + 3 C) or 3 num_mix for C = 1, *input_shape[1:])``, for data on ``num_levels``
    levels ``k / (num_levels - 1)`` (8-bit images: 256; the digits: 17); ``sample`` then draws
    pixels from it (its fused sampler), ``decode`` gives the mixture's mean, and
    ``evaluation_metrics`` adds bits per dimension. ``param_shape`` is ``input_shape`` for the
    other likelihoods.

    Beta schedule: ``beta_t = beta * min(step / kl_warmup_steps, 1)`` (``beta`` when
    ``kl_warmup_steps=0``), where ``step`` is a buffer counting training-mode ``forward`` calls
    (saved in the ``state_dict``, so a resumed run continues the ramp). It is computed on the device
    as a tensor: no host synchronisation, and ``torch.compile`` traces it.
    """

    input_shape: tuple[int, ...]
    num_classes: Optional[int] = None

    conditional: ClassVar[bool] = False
    """Whether the model is conditioned on class labels: its constructor then takes ``num_classes``
    and its methods ``y`` (int64 labels ``[B]``), which they require."""
    continuous_latent: ClassVar[bool] = False
    """Whether the latent is continuous (Gaussian, with a KL per example): ``encode`` then gives
    posterior means ``[B, latent_dim]``, on which active units and ``latent_traversal`` are defined
    (their evaluation needs at least 2 examples: active units are a variance over them)."""

    def __init__(self, input_shape, *, likelihood: str = "bernoulli", gaussian_logvar="learned",
                 beta: float = 1.0, kl_warmup_steps: int = 0, free_bits: float = 0.0, backend: str = "auto",
                 image: bool = False, num_mix: int = 10, num_levels: int = 256) -> None:
        super().__init__()
        self.input_shape = as_shape("input_shape", input_shape)
        if image and len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W) for {type(self).__name__}, got {self.input_shape}")
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if isinstance(kl_warmup_steps, bool) or not isinstance(kl_warmup_steps, int) or kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be an int >= 0, got {kl_warmup_steps!r}")
        if not (isinstance(free_bits, (int, float)) and not isinstance(free_bits, bool) and free_bits >= 0):
            raise ValueError(f"free_bits must be a number >= 0 (nats per latent dimension), got {free_bits!r}")
        self.likelihood = likelihood
        self.recon_likelihood = make_likelihood(likelihood, gaussian_logvar, self.input_shape, backend, num_mix,
                                                num_levels)
        # what the decoder outputs per example: the likelihood's parameters
        self.param_shape = (self.recon_likelihood.param_shape(self.input_shape) if likelihood == "dmol"
                            else self.input_shape)
        self.beta = float(beta)
        self.kl_warmup_steps = kl_warmup_steps
        self.free_bits = float(free_bits)
        self.backend = backend
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ checks
    def _check_x(self, x, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [B, {', '.join(map(str, self.input_shape))}], "
                            f"got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{name} must have shape [B, {', '.join(map(str, self.input_shape))}] for this "
                             f"{type(self).__name__}, got {tuple(x.shape)}")

    def _check_y(self, y, batch: int, device: torch.device) -> None:
        if self.num_classes is None:
            if y is not None:
                raise ValueError(f"y must be None: {type(self).__name__} is not conditional (use CVAE for labels)")
            return
        if y is None:
            raise ValueError(f"y is required: {type(self).__name__} is conditioned on class labels "
                             f"(int64 [B] in [0, {self.num_classes}))")
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class labels, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        if tuple(y.shape) != (batch,):
            raise ValueError(f"y must have shape [B] = [{batch}] (one label per example), got {tuple(y.shape)}")
        if y.device != device:
            raise ValueError(f"y is on {y.device} but x is on {device}")
        msg = f"y must hold class labels in [0, {self.num_classes})"
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            # Reading a CPU tensor is no device synchronisation; elsewhere a device-side assert.
            if batch and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{msg}, got values in [{int(y.min())}, {int(y.max())}]")
        else:
            torch._assert_async(((y >= 0) & (y < self.num_classes)).all(), msg)

    def _labels(self, y, n: int, device: torch.device):
        """``y`` for ``n`` generated examples: a tensor [n] or one int for all (conditional models)."""
        if self.num_classes is not None and isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((n,), y, dtype=torch.int64, device=device)
        self._check_y(y, n, device)
        return y

    # ------------------------------------------------------------------ the objective
    def current_beta(self) -> torch.Tensor:
        """The KL weight of the next training step, a float32 0-d tensor on the model's device."""
        if self.kl_warmup_steps == 0:
            return torch.full((), self.beta, dtype=torch.float32, device=self.step.device)
        ramp = (self.step.float() / self.kl_warmup_steps).clamp(max=1.0)
        return self.beta * ramp

    def _advance_schedule(self) -> None:
        if self.training:
            # A new tensor, not step.add_(1): under torch.compile, AOT autograd may recompute beta
            # from the buffer in backward, and would then read the incremented value.
            self.step = self.step + 1

    def _recon_nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.recon_likelihood(params, x)

    def _to_data(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder output (logits or mean) -> data-space mean / probability."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        if self.likelihood == "continuous_bernoulli":
            return continuous_bernoulli_mean(params)
        if self.likelihood == "dmol":
            return self.recon_likelihood.mean(params)
        return params

    def _draw(self, params: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """What :meth:`sample` shows for decoder output ``params``: a draw from the discretized
        likelihood (its fused sampler, the seed from ``generator`` or PyTorch's), else the
        data-space mean."""
        if self.likelihood != "dmol":
            return self._to_data(params)
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        return self.recon_likelihood.sample(params, seed=seed)

    def _recon(self, params: torch.Tensor) -> torch.Tensor:
        """``forward``'s reconstruction: detached, so that autograd keeps no data-space copy of the
        decoder's output through backward (the loss reads the likelihood's parameters directly);
        ``decode`` gives a differentiable one."""
        with torch.no_grad():
            return self._to_data(params.detach())

    # ------------------------------------------------------------------ the method set
    def encode(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, y=None, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def negative_elbo(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, seed: Optional[int] = 0) -> torch.Tensor:
        raise NotImplementedError

    def log_importance_weights(self, x: torch.Tensor, k: int, y: Optional[torch.Tensor] = None, *,
                               seed: Optional[int] = None) -> torch.Tensor:
        """``[k, B]`` float32 log importance weights ``log p(x, z_i) - log q(z_i | x)`` for ``k``
        posterior draws per example: what :func:`pyvae.metrics.iwae_nll` averages."""
        raise NotImplementedError(f"{type(self).__name__} provides no importance weights")

    @property
    def fixed_kl(self) -> Optional[float]:
        """The KL term of the ELBO when it is the same for every input (a VQ-VAE's ``h * w * log K``),
        else None. Where it is fixed, the reconstruction NLL is the informative part of the ELBO."""
        return None

    @torch.no_grad()
    def evaluation_metrics(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                           x_train: Optional[torch.Tensor] = None, iwae_k: int = 100,
                           seed: Optional[int] = 0) -> dict[str, Any]:
        """The numbers that describe the model on held-out examples ``x`` (with their labels ``y``
        for a conditional model), by name, as ``pyvae train`` writes them to metrics.json: first
        ``test_negative_elbo`` (the mean of :meth:`negative_elbo`; for a discretized likelihood also
        ``test_bits_per_dim``, the same in bits per dimension), then each model's own (a KL,
        importance-weighted bound and active units, or code usage). ``x_train``: the training
        examples, for numbers that compare the two (a VQ-VAE's code usage in training); ``iwae_k``
        and ``seed``: the importance-weighted bound's samples and noise. In eval mode (the model's
        mode is restored after), in chunks of 512 examples."""
        with evaluating(self):
            nelbo = per_example(self.negative_elbo, x, y)
        result = {"test_negative_elbo": float(nelbo.double().mean())}
        if self.discrete_data:
            result["test_bits_per_dim"] = float(bits_per_dim(nelbo.double().mean(), math.prod(self.input_shape)))
        return result

    @property
    def discrete_data(self) -> bool:
        """Whether the likelihood is a probability mass on a grid of levels (``"dmol"``), so that the
        negative ELBO is a code length and bits per dimension compare across models."""
        return self.likelihood == "dmol"

    @torch.no_grad()
    def prior_samples(self, per_row: int = 8, *, generator: Optional[torch.Generator] = None) -> ImageGrid:
        """Samples to show in rows of ``per_row``: ``per_row`` rows of draws from the prior, or, for a
        conditional model, a row per class."""
        if self.conditional:
            labels = torch.arange(self.num_classes, device=self.step.device).repeat_interleave(per_row)
            return ImageGrid(self.sample(len(labels), labels, generator=generator), per_row,
                             "samples (one row per class)")
        title = "samples from the prior" + (" (every pixel drawn from p(x|z))" if self.discrete_data else "")
        return ImageGrid(self.sample(per_row * per_row, generator=generator), per_row, title)

    def reconstruct(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``decode(encode(x, y), y)``: the reconstruction from the posterior mean, in data space."""
        return self.decode(self.encode(x, y), y)

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8, method: str = "linear",
                    y=None) -> torch.Tensor:
        """Decodes ``steps`` latents from ``encode(x1)`` to ``encode(x2)`` (single examples
        ``[*input_shape]``): ``method="linear"`` or ``"slerp"`` (spherical, Shoemake 1985; linear
        where the two latents are parallel). ``y``: one label (int or 0-d/[1] tensor) for both, for
        conditional models. Returns ``[steps, *input_shape]``."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        if method not in ("linear", "slerp"):
            raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
        for name, v in (("x1", x1), ("x2", x2)):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != self.input_shape:
                raise ValueError(f"{name} must be one example of shape {list(self.input_shape)}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        x = torch.stack([x1, x2])
        if self.num_classes is not None and isinstance(y, torch.Tensor):
            if y.numel() != 1:
                raise ValueError(f"y must be one label (an int or a one-element tensor) for both x1 and x2, got "
                                 f"shape {tuple(y.shape)}")
            y = int(y.reshape(()))
        y2 = self._labels(y, 2, x.device)
        z = self.encode(x, y2)
        z1, z2 = z[0].reshape(-1), z[1].reshape(-1)
        t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype).unsqueeze(1)
        if method == "linear":
            w1, w2 = 1 - t, t
        else:
            cos = torch.dot(z1, z2) / (z1.norm() * z2.norm()).clamp_min(1e-12)
            omega = torch.arccos(cos.clamp(-1.0, 1.0))
            sin = torch.sin(omega)
            parallel = sin < 1e-6
            safe = torch.where(parallel, torch.ones_like(sin), sin)
            w1 = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
            w2 = torch.where(parallel, t, torch.sin(t * omega) / safe)
        path = (w1 * z1 + w2 * z2).reshape(steps, *z.shape[1:])
        ys = None if y2 is None else y2[:1].expand(steps)
        return self.decode(path, ys)

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, seed: Optional[int] = 0) -> torch.Tensor:
        """``[B]`` per-example negative ELBO (higher = more anomalous), from a posterior sample
        drawn with ``seed`` (fixed by default, so a score is repeatable)."""
        return self.negative_elbo(x, y, seed=seed)
