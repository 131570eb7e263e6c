"""Layers built on pyvae.ops."""
from .fsq import FSQ
from .latent import GaussianLatent
from .posterior import DiagonalGaussianDistribution
from .likelihood import BernoulliLikelihood, ContinuousBernoulliLikelihood, DiscretizedMixLogistic, GaussianLikelihood
from .rvq import ResidualVectorQuantizer
from .vq import VectorQuantizer
from .vq_compat import VectorQuantize

__all__ = ["FSQ", "BernoulliLikelihood", "ContinuousBernoulliLikelihood", "DiagonalGaussianDistribution", "DiscretizedMixLogistic", "GaussianLatent", "GaussianLikelihood",
           "ResidualVectorQuantizer", "VectorQuantize", "VectorQuantizer"]
