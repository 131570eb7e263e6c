"""Layers built on pyvae.ops."""
from .latent import GaussianLatent
from .likelihood import BernoulliLikelihood, ContinuousBernoulliLikelihood, DiscretizedMixLogistic, GaussianLikelihood
from .vq import VectorQuantizer
from .vq_compat import VectorQuantize

__all__ = ["BernoulliLikelihood", "ContinuousBernoulliLikelihood", "DiscretizedMixLogistic", "GaussianLatent", "GaussianLikelihood",
           "VectorQuantize", "VectorQuantizer"]
