// CPU kernels of the reconstruction likelihoods. The work items are (row, column block) pairs
// (kLikelihoodColumnBlock columns each), so a batch of a few long rows still uses every thread;
// each item writes its own partial sum and the caller adds a row's partials in block order.
#include "likelihood.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "chunk.h"

namespace pyvae::cpu {
namespace {

template <Loss kLoss>
using LossTag = std::integral_constant<Loss, kLoss>;

template <typename F>
void with_loss(Loss loss, F&& f) {
  switch (loss) {
    case Loss::kBernoulli: return f(LossTag<Loss::kBernoulli>{});
    case Loss::kGaussian: return f(LossTag<Loss::kGaussian>{});
    case Loss::kContinuousBernoulli: return f(LossTag<Loss::kContinuousBernoulli>{});
  }
}

// The element loops, vectorised per loss (target_clones does not apply to templates, hence the
// explicit wrappers below).
template <Loss kLoss>
inline __attribute__((always_inline)) void values_impl(const float* __restrict pred, const float* __restrict target,
                                                       const float* __restrict logvar, float constant, int64_t n,
                                                       float* __restrict out) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    out[c] = loss_terms<kLoss>(pred[c], target[c], logvar[c], constant).value;
  }
}

template <Loss kLoss>
inline __attribute__((always_inline)) void grads_impl(const float* __restrict pred, const float* __restrict target,
                                                      const float* __restrict logvar, const float* __restrict grad, int64_t n,
                                                      float* __restrict d_pred, float* __restrict d_target,
                                                      float* __restrict d_logvar) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const LossTerms t = loss_terms<kLoss>(pred[c], target[c], logvar[c], 0.0f);
    d_pred[c] = grad[c] * t.d_pred;
    d_target[c] = grad[c] * t.d_target;
    d_logvar[c] = grad[c] * t.d_logvar;
  }
}

#define PYVAE_LOSS_LOOPS(NAME, LOSS)                                                                        \
  PYVAE_MULTIVERSION void NAME##_values(const float* pred, const float* target, const float* logvar,        \
                                        float constant, int64_t n, float* out) {                            \
    values_impl<LOSS>(pred, target, logvar, constant, n, out);                                              \
  }                                                                                                         \
  PYVAE_MULTIVERSION void NAME##_grads(const float* pred, const float* target, const float* logvar,         \
                                       const float* grad, int64_t n, float* d_pred, float* d_target,        \
                                       float* d_logvar) {                                                   \
    grads_impl<LOSS>(pred, target, logvar, grad, n, d_pred, d_target, d_logvar);                            \
  }
PYVAE_LOSS_LOOPS(bernoulli, Loss::kBernoulli)
PYVAE_LOSS_LOOPS(gaussian, Loss::kGaussian)
PYVAE_LOSS_LOOPS(continuous_bernoulli, Loss::kContinuousBernoulli)
#undef PYVAE_LOSS_LOOPS

template <Loss kLoss>
void values(const float* pred, const float* target, const float* logvar, float constant, int64_t n, float* out) {
  if constexpr (kLoss == Loss::kBernoulli) bernoulli_values(pred, target, logvar, constant, n, out);
  if constexpr (kLoss == Loss::kGaussian) gaussian_values(pred, target, logvar, constant, n, out);
  if constexpr (kLoss == Loss::kContinuousBernoulli) continuous_bernoulli_values(pred, target, logvar, constant, n, out);
}

template <Loss kLoss>
void grads(const float* pred, const float* target, const float* logvar, const float* grad, int64_t n, float* d_pred,
           float* d_target, float* d_logvar) {
  if constexpr (kLoss == Loss::kBernoulli) bernoulli_grads(pred, target, logvar, grad, n, d_pred, d_target, d_logvar);
  if constexpr (kLoss == Loss::kGaussian) gaussian_grads(pred, target, logvar, grad, n, d_pred, d_target, d_logvar);
  if constexpr (kLoss == Loss::kContinuousBernoulli)
    continuous_bernoulli_grads(pred, target, logvar, grad, n, d_pred, d_target, d_logvar);
}

// The log-variances of a chunk: the logvar row, or `fixed` filled with the fixed value.
inline const float* logvar_chunk(const LikelihoodInputs& in, int64_t r, int64_t col0, const float* fixed) {
  return in.logvar ? in.logvar + r * in.logvar_row_stride + col0 : fixed;
}

// The element math is long enough per cache line that the hardware prefetcher falls behind: ask
// for the next chunk of both inputs while this one is computed.
template <typename TP, typename TT>
inline void prefetch_next(const LikelihoodInputs& in, int64_t r, int64_t col, int64_t col_end, const TP* pred,
                          const TT* target) {
  if (col >= col_end) return;
  const int64_t n = std::min(kChunk, col_end - col);
  prefetch_span(pred + r * in.pred_row_stride + col, n * sizeof(TP));
  prefetch_span(target + r * in.target_row_stride + col, n * sizeof(TT));
}

// Calls f(row, col_begin, col_end, block) for every (row, column block), in parallel.
template <typename F>
void for_each_block(const LikelihoodInputs& in, F&& f) {
  const int64_t blocks = column_blocks(in.cols);
  const int64_t items = in.rows * blocks;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(in.cols, kLikelihoodColumnBlock));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / blocks, block = item % blocks;
      const int64_t col_begin = block * kLikelihoodColumnBlock;
      f(r, col_begin, std::min(in.cols, col_begin + kLikelihoodColumnBlock), block);
    }
  });
}

template <Loss kLoss, typename TP, typename TT>
void forward_impl(const LikelihoodForwardParams& p) {
  const LikelihoodInputs& in = p.in;
  const TP* pred = static_cast<const TP*>(in.pred);
  const TT* target = static_cast<const TT*>(in.target);
  const int64_t blocks = column_blocks(in.cols);
  for_each_block(in, [&](int64_t r, int64_t col_begin, int64_t col_end, int64_t block) {
    alignas(64) float pred_buf[kChunk], target_buf[kChunk], value_buf[kChunk], fixed[kChunk];
    std::fill(fixed, fixed + kChunk, in.fixed_logvar);
    float lanes[kLanes] = {};
    for (int64_t col0 = col_begin; col0 < col_end; col0 += kChunk) {
      const int64_t n = std::min(kChunk, col_end - col0);
      prefetch_next(in, r, col0 + kChunk, col_end, pred, target);
      const float* pred_f = as_float(pred + r * in.pred_row_stride + col0, n, pred_buf);
      const float* target_f = as_float(target + r * in.target_row_stride + col0, n, target_buf);
      float* out = p.per_element ? p.loss + r * in.cols + col0 : value_buf;
      values<kLoss>(pred_f, target_f, logvar_chunk(in, r, col0, fixed), in.constant, n, out);
      if (!p.per_element) accumulate_lanes(out, n, lanes);
    }
    if (!p.per_element) p.loss[r * blocks + block] = sum_lanes(lanes);
  });
}

template <Loss kLoss, typename TP, typename TT>
void backward_impl(const LikelihoodBackwardParams& p) {
  const LikelihoodInputs& in = p.in;
  const TP* pred = static_cast<const TP*>(in.pred);
  const TT* target = static_cast<const TT*>(in.target);
  TP* grad_pred = static_cast<TP*>(p.grad_pred);
  TT* grad_target = static_cast<TT*>(p.grad_target);
  for_each_block(in, [&](int64_t r, int64_t col_begin, int64_t col_end, int64_t) {
    alignas(64) float pred_buf[kChunk], target_buf[kChunk], grad_buf[kChunk], d_pred_buf[kChunk],
        d_target_buf[kChunk], d_logvar_buf[kChunk], fixed[kChunk];
    std::fill(fixed, fixed + kChunk, in.fixed_logvar);
    for (int64_t col0 = col_begin; col0 < col_end; col0 += kChunk) {
      const int64_t n = std::min(kChunk, col_end - col0);
      prefetch_next(in, r, col0 + kChunk, col_end, pred, target);
      const float* pred_f = as_float(pred + r * in.pred_row_stride + col0, n, pred_buf);
      const float* target_f = as_float(target + r * in.target_row_stride + col0, n, target_buf);
      const float* grad_row = p.grad + r * p.grad_row_stride + col0 * p.grad_col_stride;
      const float* grad_f = grad_row;
      if (p.grad_col_stride != 1) {  // a per-sample or scalar upstream gradient (stride 0)
        for (int64_t c = 0; c < n; ++c) grad_buf[c] = grad_row[c * p.grad_col_stride];
        grad_f = grad_buf;
      }
      TP* grad_pred_row = grad_pred + r * in.cols + col0;
      float* d_pred = float_target(grad_pred_row, d_pred_buf);
      float* d_target = grad_target ? float_target(grad_target + r * in.cols + col0, d_target_buf) : d_target_buf;
      float* d_logvar = p.grad_logvar ? p.grad_logvar + r * in.cols + col0 : d_logvar_buf;
      grads<kLoss>(pred_f, target_f, logvar_chunk(in, r, col0, fixed), grad_f, n, d_pred, d_target, d_logvar);
      store_chunk(d_pred, n, grad_pred_row);
      if (grad_target) store_chunk(d_target, n, grad_target + r * in.cols + col0);
    }
  });
}

template <typename F>
void dispatch(const LikelihoodInputs& in, F&& f) {
  with_loss(in.loss, [&](auto loss) {
    with_dtype(in.pred_dtype, [&](auto tp) { with_dtype(in.target_dtype, [&](auto tt) { f(loss, tp, tt); }); });
  });
}

}  // namespace

void likelihood_forward(const LikelihoodForwardParams& p) {
  dispatch(p.in, [&](auto loss, auto tp, auto tt) { forward_impl<decltype(loss)::value, decltype(tp), decltype(tt)>(p); });
}

void likelihood_backward(const LikelihoodBackwardParams& p) {
  dispatch(p.in, [&](auto loss, auto tp, auto tt) { backward_impl<decltype(loss)::value, decltype(tp), decltype(tt)>(p); });
}

}  // namespace pyvae::cpu
