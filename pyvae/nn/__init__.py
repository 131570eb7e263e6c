"""Layers built on pyvae.ops."""
from .latent import GaussianLatent
from .likelihood import BernoulliLikelihood, ContinuousBernoulliLikelihood, GaussianLikelihood
from .vq import VectorQuantizer
from .vq_compat import VectorQuantize

__all__ = ["BernoulliLikelihood", "ContinuousBernoulliLikelihood", "GaussianLatent", "GaussianLikelihood",
           "VectorQuantize", "VectorQuantizer"]
