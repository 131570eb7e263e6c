// CPU kernel of the discretized mixture of logistics. The work items are (sample, block of
// kDmolPositionBlock positions); an item walks its positions in tiles of kTile, each tile loaded
// as floats [parameter][position] (a transpose for channels-last parameters), so that every step
// of the math is a loop over the tile's positions that g++ vectorises. Each item writes its
// partial sum (or its positions' NLLs); the caller adds a sample's partials in block order.
#include "dmol.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "chunk.h"

namespace pyvae::cpu {
namespace {

constexpr int64_t kTile = 64;  // positions per tile

// The scratch of one tile, [rows][kTile] each, reused across the tiles of a thread.
struct Tile {
  std::vector<float> params, x, log_mix, joint, d_centered, d_log_scale, tanh_coef, grad;
  float nll[kTile];
  Tile(int64_t num_params, int64_t channels, int64_t num_mix)
      : params(num_params * kTile), x(channels * kTile), log_mix(num_mix * kTile), joint(num_mix * kTile),
        d_centered(channels * num_mix * kTile), d_log_scale(channels * num_mix * kTile),
        tanh_coef(channels * num_mix * kTile), grad(num_params * kTile) {}
};

// rows x n values at base[r * row_stride + t * col_stride] into out[r * kTile + t], as floats.
template <typename T>
void load_rows(const T* base, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride, float* out) {
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < n; ++t) out[r * kTile + t] = static_cast<float>(base[r * row_stride + t]);
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) out[r * kTile + t] = static_cast<float>(base[r * row_stride + t * col_stride]);
  }
}

template <typename T>
void store_rows(const float* in, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride, T* base) {
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < n; ++t) base[r * row_stride + t] = static_cast<T>(in[r * kTile + t]);
  } else {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) base[r * row_stride + t * col_stride] = static_cast<T>(in[r * kTile + t]);
  }
}

struct Shape {
  int64_t channels, num_mix, block;  // block: parameters per channel (2M for one channel, 3M for three)
  float half_bin, half_classes, last_class, log_half_classes, grad_scale;
};

// The NLL of the tile's n positions, and with `grads` the gradient rows of its parameters.
PYVAE_MULTIVERSION void dmol_tile(const Shape& s, int64_t n, bool grads, Tile& w) {
  const int64_t M = s.num_mix, C = s.channels;
  const float* logits = w.params.data();
  float* log_mix = w.log_mix.data();
  // log-softmax of the mixture logits
  alignas(64) float top[kTile], total[kTile];
  for (int64_t t = 0; t < kTile; ++t) top[t] = -INFINITY, total[t] = 0.0f;
  for (int64_t i = 0; i < M; ++i)
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) top[t] = std::max(top[t], logits[i * kTile + t]);
  for (int64_t i = 0; i < M; ++i)
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) total[t] += exp_f(logits[i * kTile + t] - top[t]);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) top[t] += log_f(total[t]);
  for (int64_t i = 0; i < M; ++i)
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) log_mix[i * kTile + t] = logits[i * kTile + t] - top[t];
  // each channel's component terms, added into the joint log-probability of each component
  std::copy(log_mix, log_mix + M * kTile, w.joint.begin());
  const float* x = w.x.data();
  // locals, not the struct's fields: g++ vectorises no loop that reads them through the reference
  const float half_classes = s.half_classes, last_class = s.last_class, half_bin = s.half_bin;
  const float log_half_classes = s.log_half_classes;
  for (int64_t c = 0; c < C; ++c) {
    const float* means = w.params.data() + (M + c * s.block) * kTile;
    const float* log_scales = means + M * kTile;
    float* tanh_coef = w.tanh_coef.data() + c * M * kTile;
    if (C == 3)
      for (int64_t i = 0; i < M; ++i)
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) tanh_coef[i * kTile + t] = tanh_f(log_scales[(M + i) * kTile + t]);
    const float* xc = x + c * kTile;
    for (int64_t i = 0; i < M; ++i) {
      const float* t0 = w.tanh_coef.data() + i * kTile;  // channel 0's coefficients: R into G
      const float* t1 = t0 + M * kTile;                  // channel 1's: R into B
      const float* t2 = t1 + M * kTile;                  // channel 2's: G into B
      float* joint = w.joint.data() + i * kTile;
      float* d_centered = w.d_centered.data() + (c * M + i) * kTile;
      float* d_log_scale = w.d_log_scale.data() + (c * M + i) * kTile;
      alignas(64) float centered[kTile];  // x - the coupled mean (a loop of its own: no branch below)
      if (c == 0) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) centered[t] = xc[t] - means[i * kTile + t];
      } else if (c == 1) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) centered[t] = xc[t] - (means[i * kTile + t] + t0[t] * x[t]);
      } else {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t)
          centered[t] = xc[t] - (means[i * kTile + t] + t1[t] * x[t] + t2[t] * x[kTile + t]);
      }
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        const DmolBinTerms b = dmol_bin_terms(centered[t], log_scales[i * kTile + t], dmol_class(xc[t], half_classes),
                                              last_class, half_bin, log_half_classes);
        joint[t] += b.log_prob;
        d_centered[t] = b.d_centered;
        d_log_scale[t] = b.d_log_scale;
      }
    }
  }
  // log-sum-exp over the components
  for (int64_t t = 0; t < kTile; ++t) top[t] = -INFINITY, total[t] = 0.0f;
  for (int64_t i = 0; i < M; ++i)
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) top[t] = std::max(top[t], w.joint[i * kTile + t]);
  for (int64_t i = 0; i < M; ++i)
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) total[t] += exp_f(w.joint[i * kTile + t] - top[t]);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) w.nll[t] = -(top[t] + log_f(total[t]));
  if (!grads) return;
  // d nll / d logit_i = softmax_i - posterior_i; d nll / d(component term) = -posterior_i
  const float scale = s.grad_scale;
  for (int64_t i = 0; i < M; ++i) {
    float* joint = w.joint.data() + i * kTile;  // becomes the posterior times the scale
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      const float posterior = exp_f(joint[t] + w.nll[t]);
      w.grad[i * kTile + t] = (exp_f(log_mix[i * kTile + t]) - posterior) * scale;
      joint[t] = posterior * scale;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* g_means = w.grad.data() + (M + c * s.block) * kTile;
    float* g_log_scales = g_means + M * kTile;
    float* g_coefs = g_log_scales + M * kTile;
    for (int64_t i = 0; i < M; ++i) {
      const float* weight = w.joint.data() + i * kTile;
      const float* d_centered = w.d_centered.data() + (c * M + i) * kTile;
      const float* d_log_scale = w.d_log_scale.data() + (c * M + i) * kTile;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        g_means[i * kTile + t] = weight[t] * d_centered[t];  // d centered / d mean = -1, d nll = -weight
        g_log_scales[i * kTile + t] = -weight[t] * d_log_scale[t];
      }
    }
  }
  if (C == 3) {  // mean_G = m_G + t0 R, mean_B = m_B + t1 R + t2 G: d/d raw coef = d mean * value * (1 - t^2)
    const int64_t coefs = M + 2 * M;  // channel 0's coefficients, then channel 1's and 2's a block apart
    for (int64_t i = 0; i < M; ++i) {
      const float* g_mean_g = w.grad.data() + (M + s.block + i) * kTile;
      const float* g_mean_b = w.grad.data() + (M + 2 * s.block + i) * kTile;
      const float* t0 = w.tanh_coef.data() + i * kTile;
      const float* t1 = t0 + M * kTile;
      const float* t2 = t1 + M * kTile;
      float* g0 = w.grad.data() + (coefs + i) * kTile;
      float* g1 = g0 + s.block * kTile;
      float* g2 = g1 + s.block * kTile;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        g0[t] = g_mean_g[t] * x[t] * (1.0f - t0[t] * t0[t]);
        g1[t] = g_mean_b[t] * x[t] * (1.0f - t1[t] * t1[t]);
        g2[t] = g_mean_b[t] * x[kTile + t] * (1.0f - t2[t] * t2[t]);
      }
    }
  }
}

template <typename TP, typename TX>
void dmol_impl(const DmolParams& p) {
  const TP* params = static_cast<const TP*>(p.params);
  const TX* x = static_cast<const TX*>(p.x);
  TP* grad = static_cast<TP*>(p.grad);
  const int64_t blocks = dmol_position_blocks(p.positions);
  const Shape shape{p.channels, p.num_mix, p.channels == 3 ? 3 * p.num_mix : 2 * p.num_mix,
                    1.0f / static_cast<float>(p.num_classes - 1), 0.5f * static_cast<float>(p.num_classes - 1),
                    static_cast<float>(p.num_classes - 1),
                    static_cast<float>(std::log(0.5 * static_cast<double>(p.num_classes - 1))), p.grad_scale};
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Tile w(p.num_params, p.channels, p.num_mix);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, first = (item % blocks) * kDmolPositionBlock;
      const int64_t last = std::min(p.positions, first + kDmolPositionBlock);
      float partial = 0.0f;
      for (int64_t n0 = first; n0 < last; n0 += kTile) {
        const int64_t n = std::min(kTile, last - n0);
        const int64_t params_at = b * p.params_batch_stride + n0 * p.params_position_stride;
        load_rows(params + params_at, p.num_params, n, p.params_param_stride, p.params_position_stride,
                  w.params.data());
        load_rows(x + b * p.x_batch_stride + n0 * p.x_position_stride, p.channels, n, p.x_channel_stride,
                  p.x_position_stride, w.x.data());
        dmol_tile(shape, n, grad != nullptr, w);
        if (grad != nullptr)
          store_rows(w.grad.data(), p.num_params, n, p.params_param_stride, p.params_position_stride,
                     grad + params_at);
        if (p.per_position) {
          std::copy(w.nll, w.nll + n, p.nll + b * p.positions + n0);
        } else {
          for (int64_t t = 0; t < n; ++t) partial += w.nll[t];
        }
      }
      if (!p.per_position) p.nll[b * blocks + item % blocks] = partial;
    }
  });
}

template <typename TP>
void dmol_sample_impl(const DmolSampleParams& p) {
  const TP* params = static_cast<const TP*>(p.params);
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t block = p.channels == 3 ? 3 * p.num_mix : 2 * p.num_mix;
  at::parallel_for(0, p.batch * p.positions, 256, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / p.positions, n = index % p.positions;
      const TP* at = params + b * p.params_batch_stride + n * p.params_position_stride;
      const auto param = [&](int64_t j) { return static_cast<float>(at[j * p.params_param_stride]); };
      float* x = p.x + b * p.x_batch_stride + n * p.x_position_stride;
      if (p.channels == 3) {
        float out[3];
        dmol_sample_position<3>(param, p.num_mix, block, seed, static_cast<uint64_t>(index), p.temperature, out);
        for (int c = 0; c < 3; ++c) x[c * p.x_channel_stride] = out[c];
      } else {
        float out[1];
        dmol_sample_position<1>(param, p.num_mix, block, seed, static_cast<uint64_t>(index), p.temperature, out);
        x[0] = out[0];
      }
    }
  });
}

}  // namespace

void dmol_sample(const DmolSampleParams& p) {
  with_dtype(p.params_dtype, [&](auto param_type) { dmol_sample_impl<decltype(param_type)>(p); });
}

void dmol(const DmolParams& p) {
  with_dtype(p.params_dtype, [&](auto param_type) {
    with_dtype(p.x_dtype, [&](auto x_type) { dmol_impl<decltype(param_type), decltype(x_type)>(p); });
  });
}

}  // namespace pyvae::cpu
