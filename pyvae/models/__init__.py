"""Thin VAE models built on pyvae.nn: VAE, ConvVAE, CVAE, VQVAE and HierarchicalVAE, one API for all.

``forward(x[, y])`` returns a :class:`ModelOutput` (``loss``, ``recon_loss``, ``kl``, ``recon``,
``z``, for VQVAE ``vq_loss``, ``indices``, ``perplexity``, for HierarchicalVAE ``kl_layers``); the
method set is ``encode``, ``decode``, ``sample``, ``reconstruct``, ``interpolate``,
``anomaly_score``, ``negative_elbo`` and ``log_importance_weights`` (what :func:`pyvae.metrics.iwae_nll` averages). ``y`` (int64 class labels
``[B]``) is required by CVAE and must be omitted for the others.

What a trainer asks a model rather than its name: ``conditional`` (it takes labels ``y``),
``continuous_latent`` (a Gaussian latent: KL, active units, ``latent_traversal``), ``fixed_kl`` (the
ELBO's KL when it is constant: VQVAE), ``evaluation_metrics`` (its numbers on held-out data) and
``prior_samples`` (samples to show, an :class:`ImageGrid`).
"""
from .base import BaseVAE, ImageGrid, ModelOutput
from .hvae import HierarchicalVAE
from .vae import CVAE, VAE, ConvVAE, GaussianVAE
from .vqvae import VQVAE

__all__ = ["BaseVAE", "CVAE", "ConvVAE", "GaussianVAE", "HierarchicalVAE", "ImageGrid", "ModelOutput", "VAE", "VQVAE"]
