// Per-element math of reparameterize + KL, shared by the CPU and CUDA kernels (the Triton kernel
// in kernels/reparam_kl.py and the reference in pyvae/ops/reparam_kl.py spell out the same
// formulas). std = exp(logvar / 2) is computed once and var = std^2 reuses it.
#pragma once
#include "hd.h"
#include "vmath.h"

namespace pyvae {

PYVAE_HD float std_from_logvar(float logvar) { return exp_f(0.5f * logvar); }

// The same for a log-variance known to lie in [-kStdNormalLogvar, kStdNormalLogvar] (clamped to
// bounds inside it, as diffusers' [-30, 20]) or NaN: exp_normal's shorter evaluation (vmath.h says
// how it matches exp_f).
constexpr float kStdNormalLogvar = 174.0f;
PYVAE_HD float std_from_bounded_logvar(float logvar) { return exp_normal(0.5f * logvar); }

// The packed ops' clamp of the log-variance, torch.clamp's: NaN stays NaN (both comparisons are
// false), and its gradient passes only where lo <= logvar <= hi (not for NaN). Written with & and
// selects, not && or std::min, so that the CPU loops vectorise.
PYVAE_HD float clamp_logvar(float logvar, float lo, float hi) {
  return logvar < lo ? lo : (logvar > hi ? hi : logvar);
}
PYVAE_HD bool clamp_passes_grad(float logvar, float lo, float hi) { return (logvar >= lo) & (logvar <= hi); }

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

// ---------------------------------------------------------------------------- a Gaussian prior
// KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) for one element,
//   0.5 (prior_logvar - logvar + (e^logvar + (mu - prior_mu)^2) / e^prior_logvar - 1),
// is evaluated as  u^2 + half_r - 0.5 (x + 1)  from
//   x      = logvar - prior_logvar,
//   half_r = e^(x - ln 2)                        (half the variance ratio r = e^x),
//   s      = e^(-(prior_logvar + ln 2) / 2)      (1 / sqrt(2 var_p)),
//   u      = (mu - prior_mu) s                   (u^2 = (mu - prior_mu)^2 / (2 var_p)).
// The variances never appear alone: e^logvar / e^prior_logvar would overflow (inf / inf = NaN) as
// soon as logvar > 88.7 whatever the ratio. The factors 1/2 sit inside the exponentials, so half_r
// and u^2 overflow only where they themselves exceed FLT_MAX, and then so does the KL (a sum of
// them and terms that are at most |x| / 2). s overflows only for prior_logvar < -177 (a prior
// variance of 1e-77, zero in float32), where a zero difference mu - prior_mu is kept at u = 0.
// (The standard normal, prior = None, keeps kl_term above: the kernels pick it at compile time.)
// (Written with scalar outputs and small structs: a four-float struct in the loop body, or a
// condition joined by &&, stops g++ vectorising the CPU loops.)
constexpr float kLn2 = 0.693147180559945309f;

PYVAE_HD void prior_kl_parts(float mu, float logvar, float prior_mu, float prior_logvar, float& x, float& half_r,
                             float& s, float& u) {
  x = logvar - prior_logvar;
  const float d = mu - prior_mu;
  s = exp_f(-0.5f * (prior_logvar + kLn2));
  half_r = exp_f(x - kLn2);
  u = d == 0.0f ? 0.0f : d * s;
}

PYVAE_HD float kl_term_prior(float mu, float logvar, float prior_mu, float prior_logvar) {
  float x, half_r, s, u;
  prior_kl_parts(mu, logvar, prior_mu, prior_logvar, x, half_r, s, u);
  return u * u + half_r - 0.5f * (x + 1.0f);
}

// With r = e^(logvar - prior_logvar), d = mu - prior_mu, w = e^(-prior_logvar):
//   d/dmu = d w = 2 u s,  d/dprior_mu = -d w,  d/dlogvar = 0.5 (r - 1) = half_r - 0.5,
//   d/dprior_logvar = 0.5 (1 - r - d^2 w) = 0.5 - half_r - u^2
// (d w = 0 for d = 0 also where s overflows: u = 0 there, and 0 * inf would be NaN; a NaN s
// still gives NaN).
struct PriorKLGrads {
  float mu, logvar, prior_logvar;  // d/dprior_mu = -mu
};

PYVAE_HD PriorKLGrads prior_kl_grads(float mu, float logvar, float prior_mu, float prior_logvar) {
  float x, half_r, s, u;
  prior_kl_parts(mu, logvar, prior_mu, prior_logvar, x, half_r, s, u);
  return {u == 0.0f ? (s != s ? s : 0.0f) : 2.0f * (u * s), half_r - 0.5f, 0.5f - half_r - u * u};
}

// Backward for one element with a prior and an upstream KL gradient gkl (without one, the prior
// plays no part and input_grads above applies): the gradients of mu and logvar from the KL's
// derivatives d = prior_kl_grads(...) (passed as d.mu, d.logvar). The prior's own per-element
// gradients are -gkl * d.mu and gkl * d.prior_logvar (summed over broadcast dims by the caller).
PYVAE_HD InputGrads input_grads_prior(bool has_grad_z, float dkl_dmu, float dkl_dlogvar, float std, float gz_sum,
                                      float gz_eps_sum, float gkl) {
  return {gz_sum + gkl * dkl_dmu, (has_grad_z ? z_dlogvar(std, gz_eps_sum) : 0.0f) + gkl * dkl_dlogvar};
}

}  // namespace pyvae
