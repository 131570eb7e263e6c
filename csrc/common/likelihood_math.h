// Per-element negative log-likelihoods and their derivatives, shared by the CPU and CUDA kernels
// (kernels/likelihood.py spells out the same formulas in Triton; pyvae/ops/likelihood.py holds the
// reference). Each loss maps (prediction p, target t, log-variance v) to the loss term and its
// partial derivatives with respect to p, t and v.
#pragma once
#include <float.h>

#include "hd.h"
#include "vmath.h"

namespace pyvae {

enum class Loss : int { kBernoulli = 0, kGaussian = 1, kContinuousBernoulli = 2 };

struct LossTerms {
  float value, d_pred, d_target, d_logvar;
};

// sigmoid(x) and log1p(e^-|x|) (softplus(x) = max(x, 0) + log1p(e^-|x|), stable for any x), sharing
// e = e^-|x| (passed in: see kUsesExpNegAbs) and 1 / (1 + e). e is returned too, for the continuous
// Bernoulli's normaliser.
struct SoftplusSigmoid {
  float sigmoid, exp_neg_abs, log1p_exp_neg_abs;
};

PYVAE_HD SoftplusSigmoid softplus_sigmoid_f(float x, float exp_neg_abs_x) {
  const float e = exp_neg_abs_x;
  const float r = 1.0f / (1.0f + e);
  return {x >= 0.0f ? r : e * r, e, log1p_unit(e)};
}

// The Bernoulli losses at an infinite logit l. softplus(l) - t l = c l + log1p(e^-|l|), c = 1 - t for
// l > 0 and -t otherwise (d/dl of relu(l) - t l), is then c l: +inf, -inf, or 0 for c = 0 (the target
// the logit predicts with certainty: 0 * inf = NaN in IEEE arithmetic). The same for the continuous
// Bernoulli's c l - log|l| + o(1), with -inf for c = 0 (see cb_log1p_exp_minus_log_norm).
PYVAE_HD float limit_coefficient(float l, float t) { return (l > 0.0f ? 1.0f : 0.0f) - t; }

// c * l, but 0 for c = 0 (one select; a NaN l with c = 0 gives 0 here, the NaN log1p term a NaN loss).
PYVAE_HD float limit_product(float c, float l) {
  const float product = c * l;
  return c == 0.0f ? 0.0f : product;
}

// The continuous Bernoulli's log(1 + e) - log C(l), C = l / tanh(l / 2) its normaliser (even in l),
// e = e^-|l| and log1p(e) from softplus_sigmoid_f: the loss is c l + this. Below |l| = 0.25 with
// log C's Taylor series (error < 2e-9), above it log1p(-e) - log|l| (log1p(e) cancels). At l = ±inf
// it is -88.72, not -inf (log_unit(inf) = 128 ln 2), so that c l decides: cb_limit_product.
PYVAE_HD float cb_log1p_exp_minus_log_norm(float l, float e, float log1p_e) {
  const float a = fabsf(l);
  const float z = l * l;
  const float series = 0.69314718055994531f + z * (1.0f / 12.0f + z * (-7.0f / 1440.0f + z * (31.0f / 90720.0f)));
  // a NaN l gives NaN through log1p_f(-e); below 0.25 discarded (a may be 0 there)
  const float direct = log1p_f(-e) - log_unit(a);
  return a < 0.25f ? log1p_e - series : direct;
}

// c * l for the continuous Bernoulli: 0 for c = 0 at finite l, and there -inf at l = ±inf (the limit
// of -log|l|), so that + cb_log1p_exp_minus_log_norm (finite) is the limit l -> ±inf: +inf where
// c l = +inf, else -inf.
PYVAE_HD float cb_limit_product(float c, float l) {
  const float product = c * l;
  return c == 0.0f ? (fabsf(l) == INFINITY ? -INFINITY : 0.0f) : product;
}

// d log C / dl = 1/l - 1/sinh(l), e = e^-|l|.
PYVAE_HD float cb_log_norm_grad(float l, float e) {
  const float a = fabsf(l);
  const float z = l * l;
  const float series = l * (1.0f / 6.0f + z * (-7.0f / 360.0f + z * (31.0f / 15120.0f)));
  const float inv_sinh_a = 2.0f * e / (1.0f - e * e);
  const float direct = 1.0f / (a < 0.25f ? 1.0f : l) - (l > 0.0f ? inv_sinh_a : -inv_sinh_a);
  return a < 0.25f ? series : direct;
}

// Whether a loss is a function of e^-|p| (the Bernoulli losses). The CPU kernel computes that
// exponential for a whole chunk in a loop of its own and hands it to loss_terms_given_exp: as one
// loop, exp then log1p is a dependency chain too long for the out-of-order window to overlap
// enough iterations (the measurement: ARCHITECTURE.md, Performance notes).
template <Loss kLoss>
constexpr bool kUsesExpNegAbs = kLoss != Loss::kGaussian;

PYVAE_HD float exp_neg_abs(float p) { return exp_neg(fabsf(p)); }

// The loss term of (p, t, logvar) and its derivatives; e = e^-|p| where kUsesExpNegAbs (else unused).
template <Loss kLoss>
PYVAE_HD LossTerms loss_terms_given_exp(float p, float t, float logvar, float constant, float e) {
  LossTerms out{};
  if constexpr (kLoss == Loss::kBernoulli) {
    const SoftplusSigmoid s = softplus_sigmoid_f(p, e);
    out.value = limit_product(limit_coefficient(p, t), p) + s.log1p_exp_neg_abs;  // softplus(p) - t p
    out.d_pred = s.sigmoid - t;
    out.d_target = -p;
  } else if constexpr (kLoss == Loss::kGaussian) {
    const float inv_var = exp_f(-logvar);
    const float diff = p - t;
    const float scaled = diff * inv_var;
    // logvar = -inf: the variance is 0, as for every logvar below -88.7 (where inv_var overflows): the
    // loss is +inf where t != m (inf - inf without the clamp), NaN where t == m (0 * inf).
    out.value = 0.5f * (diff * scaled + (logvar < -FLT_MAX ? -FLT_MAX : logvar)) + constant;
    out.d_pred = scaled;
    out.d_target = -scaled;
    out.d_logvar = 0.5f * (1.0f - diff * scaled);
  } else {
    const SoftplusSigmoid s = softplus_sigmoid_f(p, e);
    out.value = cb_limit_product(limit_coefficient(p, t), p) +
                cb_log1p_exp_minus_log_norm(p, s.exp_neg_abs, s.log1p_exp_neg_abs);  // softplus(p) - t p - log C
    out.d_pred = s.sigmoid - t - cb_log_norm_grad(p, s.exp_neg_abs);
    out.d_target = -p;
  }
  return out;
}

template <Loss kLoss>
PYVAE_HD LossTerms loss_terms(float p, float t, float logvar, float constant) {
  return loss_terms_given_exp<kLoss>(p, t, logvar, constant, kUsesExpNegAbs<kLoss> ? exp_neg_abs(p) : 0.0f);
}

}  // namespace pyvae
