// Per-bin formulas of the discretized mixture of logistics (pyvae/ops/dmol.py has the definition
// and the float64 reference), shared by the CPU and CUDA kernels: the log-probability of a data
// value's bin under one logistic component of one channel, and its derivatives.
#pragma once
#include <math.h>

#include "hd.h"
#include "philox.h"
#include "vmath.h"

namespace pyvae {

constexpr float kDmolLogScaleMin = -7.0f;  // log-scales are clamped below here
constexpr float kDmolLogMidMassMin = -11.512925464970229f;  // log(1e-5): a bin's mass below 1e-5: the
                                                           // mid-bin density instead

struct DmolBinTerms {
  float log_prob;     // log P(x's bin | this component and channel)
  float d_centered;   // its derivative with respect to centered = x - mean
  float d_log_scale;  // and to the raw log-scale (0 where the clamp holds it)
};

// The class of x on the grid k / (num_classes - 1) * 2 - 1 (the nearest), as a float: class 0's
// bin is open below, class num_classes - 1's above.
PYVAE_HD float dmol_class(float x, float half_classes) { return round_nearest((x + 1.0f) * half_classes); }

// sigmoid(z) and sigmoid(-z) from e = exp(-|z|), both without cancellation.
struct SigmoidPair {
  float pos, neg;
};

PYVAE_HD SigmoidPair sigmoid_pair(float z, float e) {
  const float r = 1.0f / (1.0f + e);
  return SigmoidPair{z >= 0.0f ? r : e * r, z >= 0.0f ? e * r : r};
}

// softplus(z) = max(z, 0) + log1p(e), e = exp(-|z|).
PYVAE_HD float softplus_given_exp(float z, float e) { return (z > 0.0f ? z : 0.0f) + log1p_unit(e); }

// 1 - exp(-d) for d >= 0 without cancellation: a series for small d.
PYVAE_HD float one_minus_exp_neg(float d) {
  const float series = d * (1.0f - d * (0.5f - d * (1.0f / 6.0f - d * (1.0f / 24.0f - d * (1.0f / 120.0f - d / 720.0f)))));
  return d < 0.25f ? series : 1.0f - exp_neg(d);
}

// The bin's log-mass log(sigma(a) - sigma(b)), with a, b its edges standardised, is written
// log sigma(a) + log sigma(-b) + log(1 - exp(-(a - b))) (the same value): no difference of two
// nearly equal probabilities, so 16-bit data's narrow bins keep their digits in float32. Class 0
// keeps the first term, the last class the second.
// log_half_classes = log((num_classes - 1) / 2), half_bin = 1 / (num_classes - 1).
PYVAE_HD DmolBinTerms dmol_bin_terms(float centered, float raw_log_scale, float klass, float last_class,
                                     float half_bin, float log_half_classes) {
  // The cases are floats 0 or 1 and every selection a comparison of floats, so that g++
  // vectorises the CPU kernel's loop over positions (it gives up on masks of mixed widths).
  const float is_first = klass <= 0.0f ? 1.0f : 0.0f;
  const float is_last = klass >= last_class ? 1.0f : 0.0f;
  const float log_scale = raw_log_scale < kDmolLogScaleMin ? kDmolLogScaleMin : raw_log_scale;  // NaN passes
  const float inv_scale = exp_f(-log_scale);
  const float a = inv_scale * (centered + half_bin);  // the bin's upper edge, standardised
  const float b = inv_scale * (centered - half_bin);  // its lower edge
  const float m = inv_scale * centered;               // its middle
  const float width = inv_scale * (2.0f * half_bin);  // a - b
  const float ea = exp_neg(fabsf(a)), eb = exp_neg(fabsf(b)), em = exp_neg(fabsf(m));
  const SigmoidPair sa = sigmoid_pair(a, ea), sb = sigmoid_pair(b, eb), sm = sigmoid_pair(m, em);
  const float log_below = -softplus_given_exp(-a, ea);  // log sigma(a): the mass below the upper edge
  const float log_above = -softplus_given_exp(b, eb);   // log sigma(-b): the mass above the lower edge
  const float kept = one_minus_exp_neg(width);
  // log_unit, not log_f (whose select for inf and NaN stops the vectorising); a width below the
  // smallest normal float is far below the mid-bin threshold either way
  const float log_mass = log_below + log_above + log_unit(kept > 1.17549435e-38f ? kept : 1.17549435e-38f);
  const float is_wide = log_mass > kDmolLogMidMassMin ? 1.0f : 0.0f;
  const float is_inner = 1.0f - is_first - is_last;  // num_classes >= 2: never both
  const float is_mass = is_inner * is_wide;          // a mid bin wide enough for its mass
  const float is_mid = is_inner - is_mass;           // one too narrow: the density at its middle times its width
  const float log_mid = m - log_scale - 2.0f * softplus_given_exp(m, em) - log_half_classes;
  const float log_prob = is_first > 0.0f ? log_below : is_last > 0.0f ? log_above : is_wide > 0.0f ? log_mass : log_mid;
  // d/da log sigma(a) = sigma(-a), d/db log sigma(-b) = -sigma(b), d/dwidth log(1 - e^-w) = e^-w / (1 - e^-w)
  const float d_a = is_last + is_mid > 0.0f ? 0.0f : sa.neg;
  const float d_b = is_first + is_mid > 0.0f ? 0.0f : -sb.pos;
  const float d_width = is_mass > 0.0f ? (1.0f - kept) / kept : 0.0f;
  const float d_m = is_mid > 0.0f ? sm.neg - sm.pos : 0.0f;
  // a, b, m and the width are s (.) with s = exp(-log_scale), the width not a function of centered:
  // d/dcentered = s (d_a + d_b + d_m), d/dlog_scale = -(a d_a + b d_b + m d_m + width d_width)
  const float d_centered = inv_scale * (d_a + d_b + d_m);
  const float d_log_scale = -(a * d_a + b * d_b + m * d_m + width * d_width) - is_mid;
  return DmolBinTerms{log_prob, d_centered, raw_log_scale < kDmolLogScaleMin ? 0.0f : d_log_scale};
}

// tanh(z) from e = exp(-2|z|), the sign restored.
PYVAE_HD float tanh_f(float z) {
  const float e = exp_neg(2.0f * fabsf(z));
  const float t = (1.0f - e) / (1.0f + e);
  return z < 0.0f ? -t : t;
}

// ---------------------------------------------------------------------------------------- sampling
constexpr float kDmolUniformMin = 1e-5f;  // the sampler's uniforms lie in [this, 1 - this] (PixelCNN++)

// The uniforms of one position of the sampler, one at a time: word w is word w % 4 of the Philox
// block of counter `position` in stream w / 4 (pyvae/ops/dmol.py: sampler_uniforms).
struct DmolUniforms {
  uint64_t seed, position;
  Philox4 block;
  int64_t word = 0;
  PYVAE_HD float next() {
    if (word % 4 == 0) block = philox_group(seed, position, static_cast<uint32_t>(word / 4));
    const float u = uint_to_uniform(block.v[word % 4]);
    ++word;
    return u < kDmolUniformMin ? kDmolUniformMin : u > 1.0f - kDmolUniformMin ? 1.0f - kDmolUniformMin : u;
  }
};

// One position's sample (out[c] for its `channels` channels, in [-1, 1]): the component by
// Gumbel-max over logits + temperature * gumbel, then each channel's logistic sample
// mean + temperature * scale * logit(u) given the channels before it, clamped. `param(j)` reads the
// position's parameter j; `block` is the parameters per channel (2M for one channel, 3M for three).
// kChannels (1 or 3) at compile time, so that a GPU thread keeps out[] in registers.
template <int kChannels, typename Param>
PYVAE_HD void dmol_sample_position(const Param& param, int64_t num_mix, int64_t block, uint64_t seed,
                                   uint64_t position, float temperature, float (&out)[kChannels]) {
  DmolUniforms u{seed, position, Philox4{}};
  int64_t choice = 0;
  float best = -INFINITY;
  for (int64_t i = 0; i < num_mix; ++i) {
    const float gumbel = -log_unit(-log_unit(u.next()));
    const float score = param(i) + temperature * gumbel;
    if (score > best) {  // the first of equal maxima, as torch.argmax
      best = score;
      choice = i;
    }
  }
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 0; c < kChannels; ++c) {
    const float v = u.next();
    const float noise = log_unit(v) - log1p_f(-v);
    const int64_t at = num_mix + c * block + choice;
    const float raw_log_scale = param(at + num_mix);
    const float log_scale = raw_log_scale < kDmolLogScaleMin ? kDmolLogScaleMin : raw_log_scale;
    float value = param(at) + temperature * exp_f(log_scale) * noise;
    if constexpr (kChannels == 3) {
      const int64_t coef = num_mix + 2 * num_mix + choice;  // channel 0's; channel c's is c blocks on
      if (c == 1) value += tanh_f(param(coef)) * out[0];
      if (c == 2) value += tanh_f(param(coef + block)) * out[0] + tanh_f(param(coef + 2 * block)) * out[c - 1];
    }
    out[c] = value < -1.0f ? -1.0f : value > 1.0f ? 1.0f : value;
  }
}

}  // namespace pyvae
