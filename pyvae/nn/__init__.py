"""Layers built on pyvae.ops."""
from .latent import GaussianLatent

__all__ = ["GaussianLatent"]
