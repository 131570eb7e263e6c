// Per-element math of reparameterize + KL, shared by the CPU and CUDA kernels (the Triton kernel
// in kernels/reparam_kl.py and the reference in pyvae/ops/reparam_kl.py spell out the same
// formulas). std = exp(logvar / 2) is computed once and var = std^2 reuses it.
#pragma once
#include "hd.h"
#include "vmath.h"

namespace pyvae {

PYVAE_HD float std_from_logvar(float logvar) { return exp_f(0.5f * logvar); }

// KL(N(mu, var) || N(0, 1)) for one element: -0.5 (1 + logvar - mu^2 - var).
PYVAE_HD float kl_term(float mu, float logvar, float std) {
  return 0.5f * (mu * mu + std * std - 1.0f - logvar);
}

// d kl_term / d logvar = 0.5 (var - 1);  d kl_term / d mu = mu.
PYVAE_HD float kl_dlogvar(float std) { return 0.5f * (std * std - 1.0f); }

// d z / d logvar = 0.5 std eps.
PYVAE_HD float z_dlogvar(float std, float eps) { return 0.5f * std * eps; }

// Backward for one element from the sums over samples of grad_z (gz_sum) and grad_z * eps
// (gz_eps_sum) and the KL's upstream gradient gkl. A missing upstream gradient adds nothing, as in
// autograd through the eager formulas: not 0 * inf, which would turn an infinite mu or std into NaN.
struct InputGrads {
  float mu, logvar;
};
PYVAE_HD InputGrads input_grads(bool has_grad_z, bool has_grad_kl, float mu, float std, float gz_sum,
                                float gz_eps_sum, float gkl) {
  return {gz_sum + (has_grad_kl ? gkl * mu : 0.0f),
          (has_grad_z ? z_dlogvar(std, gz_eps_sum) : 0.0f) + (has_grad_kl ? gkl * kl_dlogvar(std) : 0.0f)};
}

}  // namespace pyvae
