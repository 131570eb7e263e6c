// CPU kernel of the reconstruction likelihoods. The work items are (row, column block) pairs
// (kLikelihoodColumnBlock columns each), so a batch of a few long rows still uses every thread;
// each item writes its own partial sum and the caller adds a row's partials in block order.
#include "likelihood.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "chunk.h"

namespace pyvae::cpu {
namespace {

// The element loop of one chunk: losses, and with kGrads the derivatives too. Compile-time flags
// keep each variant a straight vectorisable loop; target_clones does not apply to templates, hence
// the wrappers. n <= kChunk.
template <Loss kLoss, bool kGrads>
inline __attribute__((always_inline)) void chunk_impl(const float* __restrict pred, const float* __restrict target,
                                                      const float* __restrict logvar, float constant,
                                                      float grad_scale, int64_t n, float* __restrict out,
                                                      float* __restrict d_pred, float* __restrict d_target,
                                                      float* __restrict d_logvar) {
  alignas(64) float exp_buf[kChunk];  // e^-|pred| in a loop of its own (see kUsesExpNegAbs)
  if constexpr (kUsesExpNegAbs<kLoss>) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) exp_buf[c] = exp_neg_abs(pred[c]);
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const LossTerms t = loss_terms_given_exp<kLoss>(pred[c], target[c], logvar[c], constant,
                                                           kUsesExpNegAbs<kLoss> ? exp_buf[c] : 0.0f);
    out[c] = t.value;
    if constexpr (kGrads) {
      d_pred[c] = t.d_pred * grad_scale;
      d_target[c] = t.d_target * grad_scale;
      d_logvar[c] = t.d_logvar * grad_scale;  // 0 but for the Gaussian
    }
  }
}

#define PYVAE_CHUNK_VARIANT(NAME, LOSS, GRADS)                                                              \
  PYVAE_MULTIVERSION void NAME(const float* pred, const float* target, const float* logvar, float constant, \
                               float grad_scale, int64_t n, float* out, float* d_pred, float* d_target,     \
                               float* d_logvar) {                                                           \
    chunk_impl<LOSS, GRADS>(pred, target, logvar, constant, grad_scale, n, out, d_pred, d_target, d_logvar); \
  }
#define PYVAE_CHUNK_VARIANTS(PREFIX, LOSS)            \
  PYVAE_CHUNK_VARIANT(PREFIX##_values, LOSS, false)   \
  PYVAE_CHUNK_VARIANT(PREFIX##_with_grads, LOSS, true)
PYVAE_CHUNK_VARIANTS(bernoulli, Loss::kBernoulli)
PYVAE_CHUNK_VARIANTS(gaussian, Loss::kGaussian)
PYVAE_CHUNK_VARIANTS(continuous_bernoulli, Loss::kContinuousBernoulli)
#undef PYVAE_CHUNK_VARIANTS
#undef PYVAE_CHUNK_VARIANT

using ChunkFn = void (*)(const float*, const float*, const float*, float, float, int64_t, float*, float*, float*,
                         float*);

ChunkFn chunk_fn(Loss loss, bool grads) {
  static constexpr ChunkFn table[3][2] = {{bernoulli_values, bernoulli_with_grads},
                                          {gaussian_values, gaussian_with_grads},
                                          {continuous_bernoulli_values, continuous_bernoulli_with_grads}};
  return table[static_cast<int>(loss)][grads ? 1 : 0];
}

template <typename TP, typename TT>
void likelihood_impl(const LikelihoodParams& p) {
  const LikelihoodInputs& in = p.in;
  const TP* pred = static_cast<const TP*>(in.pred);
  const TT* target = static_cast<const TT*>(in.target);
  TP* grad_pred = static_cast<TP*>(p.grad_pred);
  TT* grad_target = static_cast<TT*>(p.grad_target);
  const bool grads = grad_pred != nullptr || grad_target != nullptr || p.grad_logvar != nullptr;
  const ChunkFn chunk = chunk_fn(in.loss, grads);
  const int64_t blocks = column_blocks(in.cols);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(in.cols, kLikelihoodColumnBlock));
  // Work items are (group of rows, column block); a group is one row unless logvar's gradient is
  // summed over the batch (see kLogvarGroupRows): then its rows' derivatives are added, in row
  // order, into an accumulator of one column block (64 KiB at most, cache-resident) while the rows
  // themselves still stream through one after the other.
  const int64_t group_rows = p.logvar_group_rows;
  const bool group_logvar = p.grad_logvar != nullptr && group_rows > 1;
  const int64_t items = row_groups(in.rows, group_rows) * blocks;
  at::parallel_for(0, items, std::max<int64_t>(1, grain / group_rows), [&](int64_t begin, int64_t end) {
    alignas(64) float pred_buf[kChunk], target_buf[kChunk], value_buf[kChunk], fixed[kChunk], d_pred_buf[kChunk],
        d_target_buf[kChunk], d_logvar_buf[kChunk];
    std::fill(fixed, fixed + kChunk, in.fixed_logvar);
    std::vector<float> logvar_sum(group_logvar ? std::min(in.cols, kLikelihoodColumnBlock) : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / blocks, block = item % blocks;
      const int64_t col_begin = block * kLikelihoodColumnBlock;
      const int64_t col_end = std::min(in.cols, col_begin + kLikelihoodColumnBlock);
      const int64_t row_end = std::min(in.rows, (group + 1) * group_rows);
      std::fill(logvar_sum.begin(), logvar_sum.end(), 0.0f);
      for (int64_t r = group * group_rows; r < row_end; ++r) {
        float lanes[kLanes] = {};
        for (int64_t col0 = col_begin; col0 < col_end; col0 += kChunk) {
          const int64_t n = std::min(kChunk, col_end - col0);
          const int64_t at = r * in.cols + col0;  // this chunk in the contiguous outputs
          const TP* pred_row = pred + r * in.pred_row_stride + col0;
          const TT* target_row = target + r * in.target_row_stride + col0;
          const float* pred_f = as_float(pred_row, n, pred_buf);
          const float* target_f = as_float(target_row, n, target_buf);
          const float* logvar_f = in.logvar ? in.logvar + r * in.logvar_row_stride + col0 : fixed;
          float* out = p.per_element ? p.loss + at : value_buf;
          float* d_pred = grad_pred ? float_target(grad_pred + at, d_pred_buf) : d_pred_buf;
          float* d_target = grad_target ? float_target(grad_target + at, d_target_buf) : d_target_buf;
          float* d_logvar = p.grad_logvar && !group_logvar ? p.grad_logvar + at : d_logvar_buf;
          chunk(pred_f, target_f, logvar_f, in.constant, p.grad_scale, n, out, d_pred, d_target, d_logvar);
          if (!p.per_element) accumulate_lanes(out, n, lanes);
          if (grad_pred) store_chunk(d_pred, n, grad_pred + at);
          if (grad_target) store_chunk(d_target, n, grad_target + at);
          if (group_logvar) add_chunk(d_logvar, n, logvar_sum.data() + (col0 - col_begin));
        }
        if (!p.per_element) p.loss[r * blocks + block] = sum_lanes(lanes);
      }
      if (group_logvar)
        std::copy(logvar_sum.begin(), logvar_sum.begin() + (col_end - col_begin),
                  p.grad_logvar + group * in.cols + col_begin);
    }
  });
}

}  // namespace

void likelihood(const LikelihoodParams& p) {
  with_dtype(p.in.pred_dtype, [&](auto tp) {
    with_dtype(p.in.target_dtype, [&](auto tt) { likelihood_impl<decltype(tp), decltype(tt)>(p); });
  });
}

}  // namespace pyvae::cpu
