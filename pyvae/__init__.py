"""pyvae: fused kernels for variational autoencoders (reparameterize + KL, VQ, likelihoods).

Quick use::

    import pyvae
    z, kl = pyvae.reparameterize_kl(mu, logvar)               # kl per sample, fp32
    rec = pyvae.bernoulli_nll(decoder(z), x)                  # reconstruction NLL per sample, batch mean
    latent = pyvae.nn.GaussianLatent(in_features=256, latent_dim=32)
    model = pyvae.models.VAE((1, 28, 28), latent_dim=16)     # or ConvVAE, CVAE, VQVAE
    out = model(x); out.loss.backward()                      # the negative ELBO per example, fused

``pyvae train --model vae`` trains one from the command line (``python -m pyvae train``).

Every op takes ``backend=`` ("auto", "torch", "cpu", "cuda", "triton"); ``pyvae.backends.available``
lists what serves a device here; ``python -m pyvae`` prints what this install was built with.
"""
from . import backends, metrics, models, nn, ops
from .ops import (bernoulli_nll, codebook_stats, continuous_bernoulli_nll, gaussian_nll, nearest_code,
                  reparameterize_kl, vector_quantize)

__version__ = "0.1.0"
__all__ = ["backends", "bernoulli_nll", "codebook_stats", "continuous_bernoulli_nll", "gaussian_nll", "metrics",
           "models", "nearest_code", "nn", "ops", "reparameterize_kl", "vector_quantize", "__version__"]
