"""pyvae's ops: one module per op family (reference, autograd.Function, functional API)."""
from .likelihood import (LikelihoodFlag, LikelihoodFunction, LikelihoodSpec, bernoulli_nll, continuous_bernoulli_nll,
                         gaussian_nll, likelihood_reference)
from .vq import VQFunction, VQResult, codebook_stats, nearest_code, vector_quantize
from .dmol import (DMOLFunction, DMOLSpec, bits_per_dim, discretized_mix_logistic_mean, discretized_mix_logistic_nll,
                   discretized_mix_logistic_sample, dmol_reference)
from .fsq import FSQFunction, finite_scalar_quantize, fsq_reference
from .rvq import ResidualVQFunction, ResidualVQResult, residual_quantize, residual_stats
from .reparam_kl import (PackedReparamKLFunction, ReparamKLFunction, draw_seed, reference_eps, reparameterize_kl,
                         reparameterize_kl_packed, reparameterize_kl_reference)
# argument checks and reductions with one meaning on every op, for layers built on the ops
from ._common import REDUCTIONS, check_floating, check_reduction, reduce_rows

__all__ = ["REDUCTIONS", "check_floating", "check_reduction", "reduce_rows",
           "DMOLFunction", "DMOLSpec", "bits_per_dim", "discretized_mix_logistic_mean", "discretized_mix_logistic_nll",
           "discretized_mix_logistic_sample", "dmol_reference",
           "FSQFunction", "finite_scalar_quantize", "fsq_reference",
           "ResidualVQFunction", "ResidualVQResult", "residual_quantize", "residual_stats",
           "LikelihoodFlag", "LikelihoodFunction", "LikelihoodSpec", "PackedReparamKLFunction", "ReparamKLFunction", "VQFunction", "VQResult",
           "codebook_stats", "nearest_code", "vector_quantize", "bernoulli_nll", "continuous_bernoulli_nll", "draw_seed",
           "gaussian_nll", "likelihood_reference", "reference_eps", "reparameterize_kl", "reparameterize_kl_packed",
           "reparameterize_kl_reference"]
