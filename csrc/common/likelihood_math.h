// Per-element negative log-likelihoods and their derivatives, shared by the CPU and CUDA kernels
// (kernels/likelihood.py spells out the same formulas in Triton; pyvae/ops/likelihood.py holds the
// reference). Each loss maps (prediction p, target t, log-variance v) to the loss term and its
// partial derivatives with respect to p, t and v.
#pragma once
#include "hd.h"
#include "vmath.h"

namespace pyvae {

enum class Loss : int { kBernoulli = 0, kGaussian = 1, kContinuousBernoulli = 2 };

struct LossTerms {
  float value, d_pred, d_target, d_logvar;
};

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|), stable for any x, and sigmoid(x),
// sharing e = e^-|x| (passed in: see kUsesExpNegAbs) and 1 / (1 + e). e and log1p(e) are
// returned too, for the continuous Bernoulli's normaliser.
struct SoftplusSigmoid {
  float softplus, sigmoid, exp_neg_abs, log1p_exp_neg_abs;
};

PYVAE_HD SoftplusSigmoid softplus_sigmoid_f(float x, float exp_neg_abs_x) {
  const float e = exp_neg_abs_x;
  const float r = 1.0f / (1.0f + e);
  const float log1p_e = log1p_unit(e);
  return {(x > 0.0f ? x : 0.0f) + log1p_e, x >= 0.0f ? r : e * r, e, log1p_e};
}

// log C(lambda) of the continuous Bernoulli in terms of the logit l: C = l / tanh(l / 2), even in l.
// Below |l| = 0.25 its Taylor series (error < 2e-9), above it log|l| - log1p(-e) + log1p(e) with
// e = e^-|l| and log1p(e) from softplus_sigmoid_f.
PYVAE_HD float cb_log_norm(float l, float e, float log1p_e) {
  const float a = fabsf(l);
  const float z = l * l;
  const float series = 0.69314718055994531f + z * (1.0f / 12.0f + z * (-7.0f / 1440.0f + z * (31.0f / 90720.0f)));
  const float direct = log_f(a) - log1p_f(-e) + log1p_e;  // discarded below 0.25 (a may be 0 there)
  return a < 0.25f ? series : direct;
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
    out.value = s.softplus - t * p;
    out.d_pred = s.sigmoid - t;
    out.d_target = -p;
  } else if constexpr (kLoss == Loss::kGaussian) {
    const float inv_var = exp_f(-logvar);
    const float diff = p - t;
    const float scaled = diff * inv_var;
    out.value = 0.5f * (diff * scaled + logvar) + constant;
    out.d_pred = scaled;
    out.d_target = -scaled;
    out.d_logvar = 0.5f * (1.0f - diff * scaled);
  } else {
    const SoftplusSigmoid s = softplus_sigmoid_f(p, e);
    out.value = s.softplus - t * p - cb_log_norm(p, s.exp_neg_abs, s.log1p_exp_neg_abs);
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
