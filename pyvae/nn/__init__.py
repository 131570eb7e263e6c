"""Layers built on pyvae.ops."""
from .fsq import FSQ
from .latent import GaussianLatent
from .likelihood import BernoulliLikelihood, ContinuousBernoulliLikelihood, DiscretizedMixLogistic, GaussianLikelihood
from .posterior import DiagonalGaussianDistribution
from .rvq import ResidualVectorQuantizer
from .rvq_compat import ResidualVQ
from .vq import VectorQuantizer
from .vq_compat import VectorQuantize

__all__ = ["FSQ", "BernoulliLikelihood", "ContinuousBernoulliLikelihood", "DiagonalGaussianDistribution",
           "DiscretizedMixLogistic", "GaussianLatent", "GaussianLikelihood", "ResidualVQ", "ResidualVectorQuantizer",
           "VectorQuantize", "VectorQuantizer"]
