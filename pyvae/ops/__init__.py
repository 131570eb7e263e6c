"""pyvae's ops: one module per op family (reference, autograd.Function, functional API)."""
from .reparam_kl import ReparamKLFunction, draw_seed, reference_eps, reparameterize_kl, reparameterize_kl_reference

__all__ = ["ReparamKLFunction", "draw_seed", "reference_eps", "reparameterize_kl", "reparameterize_kl_reference"]
