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

``pyvae.kernels`` (the Triton kernels) lives in the repository's top-level ``kernels/`` folder, which
setup.py installs as ``pyvae/kernels``; imported from a source checkout (editable install or none),
pyvae binds it to that folder itself, below.
"""
import sys as _sys
from pathlib import Path as _Path


def _bind_checkout_kernels() -> "_Path | None":
    """In a source checkout (``pyvae/`` beside ``setup.py`` and ``kernels/``, and no ``pyvae/kernels``
    package of its own), imports ``<checkout>/kernels`` as ``pyvae.kernels`` and returns the
    checkout; in an installed pyvae (whose ``pyvae/kernels`` is a package) does nothing and returns
    None. Only the name ``pyvae.kernels`` is bound: the checkout is never put on ``sys.path``, so no
    top-level ``kernels`` module (a name another PyPI package uses) comes from pyvae."""
    import importlib.util

    package = _Path(__file__).resolve().parent
    checkout = package.parent
    kernels = checkout / "kernels" / "__init__.py"
    installed = (package / "kernels" / "__init__.py").is_file()
    if installed or not kernels.is_file() or not (checkout / "setup.py").is_file():
        return None
    if __name__ + ".kernels" not in _sys.modules:
        spec = importlib.util.spec_from_file_location(__name__ + ".kernels", kernels)
        module = importlib.util.module_from_spec(spec)  # a package: __path__ = [<checkout>/kernels]
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    globals()["kernels"] = _sys.modules[__name__ + ".kernels"]
    return checkout


#: The source checkout this pyvae was imported from (its ``kernels/`` is ``pyvae.kernels``), or None
#: for an installed copy.
SOURCE_CHECKOUT = _bind_checkout_kernels()

from . import backends, metrics, models, nn, ops  # noqa: E402
from .ops import (bernoulli_nll, bits_per_dim, codebook_stats, continuous_bernoulli_nll,
                  discretized_mix_logistic_mean, discretized_mix_logistic_nll, discretized_mix_logistic_sample,
                  finite_scalar_quantize, gaussian_nll, nearest_code, reparameterize_kl, reparameterize_kl_packed,
                  residual_quantize, vector_quantize)

__version__ = "0.1.0"
__all__ = ["backends", "bernoulli_nll", "bits_per_dim", "codebook_stats", "continuous_bernoulli_nll",
           "discretized_mix_logistic_mean", "discretized_mix_logistic_nll", "discretized_mix_logistic_sample",
           "finite_scalar_quantize", "gaussian_nll", "metrics",
           "models", "nearest_code", "nn", "ops", "reparameterize_kl", "reparameterize_kl_packed", "residual_quantize", "vector_quantize",
           "__version__"]
