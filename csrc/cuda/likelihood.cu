// CUDA kernel of the reconstruction likelihoods (losses and, where asked, gradients in one pass;
// see LikelihoodParams). The unit of work is a segment: one column block
// (kLikelihoodColumnBlock columns) of one row, so a few long rows still fill the GPU. A segment is
// covered by threads_per_segment threads, each owning four consecutive columns at a time; its sum
// is a fixed-order shuffle tree written to partial[row, block] (the caller adds the blocks in
// order): deterministic, no atomics. dtypes are run-time switches (uniform, so no divergence),
// keeping one instantiation per loss.
#include "../common/likelihood_math.h"
#include <algorithm>

#include "common.cuh"
#include "likelihood.h"

namespace pyvae::cuda {
namespace {

struct Segment {
  int64_t row, col_begin, col_end, index;
  bool active;
};

__device__ __forceinline__ Segment my_segment(const LikelihoodInputs& in, int threads_per_segment) {
  const int64_t blocks = column_blocks(in.cols);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * (kThreads / threads_per_segment) +
                        threadIdx.x / threads_per_segment;
  Segment s;
  s.index = index;
  s.active = index < in.rows * blocks;
  s.row = index / blocks;
  s.col_begin = (index % blocks) * kLikelihoodColumnBlock;
  s.col_end = min(in.cols, s.col_begin + kLikelihoodColumnBlock);
  return s;
}

__device__ __forceinline__ void load_logvar4(const LikelihoodInputs& in, int64_t row, int64_t col, float out[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    out[k] = in.logvar != nullptr && col + k < in.cols ? in.logvar[row * in.logvar_row_stride + col + k]
                                                        : in.fixed_logvar;
}

template <Loss kLoss>
__global__ void __launch_bounds__(kThreads)
    likelihood_kernel(LikelihoodParams p, int threads_per_segment, bool vec_pred, bool vec_target) {
  const LikelihoodInputs& in = p.in;
  const Segment seg = my_segment(in, threads_per_segment);
  const int lane = threadIdx.x % threads_per_segment;
  const size_t pred_size = dtype_size(in.pred_dtype), target_size = dtype_size(in.target_dtype);
  const void* pred_row = static_cast<const char*>(in.pred) + seg.row * in.pred_row_stride * pred_size;
  const void* target_row = static_cast<const char*>(in.target) + seg.row * in.target_row_stride * target_size;
  const int64_t out_row = seg.row * in.cols;  // offset of this row in the contiguous outputs
  const bool vec_out = in.cols % 4 == 0;  // fresh contiguous outputs
  float partial = 0.0f;
  for (int64_t col = seg.col_begin + 4 * lane; seg.active && col < seg.col_end; col += 4 * threads_per_segment) {
    float pred[4], target[4], logvar[4], value[4], d_pred[4], d_target[4], d_logvar[4];
    load4_dtype(in.pred_dtype, pred_row, col, seg.col_end, vec_pred, pred);
    load4_dtype(in.target_dtype, target_row, col, seg.col_end, vec_target, target);
    load_logvar4(in, seg.row, col, logvar);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool inside = col + k < seg.col_end;
      const LossTerms t = loss_terms<kLoss>(pred[k], target[k], logvar[k], in.constant);
      value[k] = inside ? t.value : 0.0f;
      d_pred[k] = t.d_pred * p.grad_scale;
      d_target[k] = t.d_target * p.grad_scale;
      d_logvar[k] = t.d_logvar * p.grad_scale;
    }
    if (p.per_element) store4(p.loss + out_row, col, seg.col_end, vec_out, value);
    if (p.grad_pred != nullptr)
      store4_dtype(in.pred_dtype, static_cast<char*>(p.grad_pred) + out_row * pred_size, col, seg.col_end, vec_out,
                   d_pred);
    if (p.grad_target != nullptr)
      store4_dtype(in.target_dtype, static_cast<char*>(p.grad_target) + out_row * target_size, col, seg.col_end,
                   vec_out, d_target);
    if (p.grad_logvar != nullptr) store4(p.grad_logvar + out_row, col, seg.col_end, vec_out, d_logvar);
    partial += (value[0] + value[1]) + (value[2] + value[3]);
  }
  if (p.per_element) return;  // uniform across the block
  const float total = row_sum(partial, threads_per_segment);
  if (seg.active && lane == 0) p.loss[seg.index] = total;
}

struct Launch {
  RowLayout layout;
  unsigned blocks;
  bool vec_pred, vec_target;
};

Launch plan(const LikelihoodInputs& in) {
  const int64_t segments = in.rows * column_blocks(in.cols);
  const RowLayout layout = row_layout(std::min(in.cols, kLikelihoodColumnBlock));
  return Launch{layout, static_cast<unsigned>((segments + layout.rows_per_block - 1) / layout.rows_per_block),
                packable_bytes(in.pred, in.pred_row_stride, in.cols, dtype_size(in.pred_dtype)),
                packable_bytes(in.target, in.target_row_stride, in.cols, dtype_size(in.target_dtype))};
}

template <typename F>
void with_loss(Loss loss, F&& f) {
  switch (loss) {
    case Loss::kBernoulli: return f(std::integral_constant<Loss, Loss::kBernoulli>{});
    case Loss::kGaussian: return f(std::integral_constant<Loss, Loss::kGaussian>{});
    case Loss::kContinuousBernoulli: return f(std::integral_constant<Loss, Loss::kContinuousBernoulli>{});
  }
}

// Four elements per thread and grid-stride, so one launch of a few waves streams any length; the
// whole grid returns at once when the scale is 1.
__global__ void __launch_bounds__(kThreads)
    scale_unless_one_kernel(void* grad, DType dtype, int64_t n, const float* scale, bool vec) {
  const float s = *scale;
  if (s == 1.0f) return;
  const int64_t stride = 4 * static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = 4 * (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x); i < n; i += stride) {
    float v[4];
    load4_dtype(dtype, grad, i, n, vec && i + 4 <= n, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] *= s;
    store4_dtype(dtype, grad, i, n, vec && i + 4 <= n, v);
  }
}

}  // namespace

void scale_unless_one(void* grad, DType dtype, int64_t n, const float* scale, cudaStream_t stream) {
  if (n == 0) return;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (n + 4 * kThreads - 1) / (4 * kThreads);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(wanted, 8 * static_cast<int64_t>(sms)));
  const bool vec = reinterpret_cast<uintptr_t>(grad) % (4 * dtype_size(dtype)) == 0;
  scale_unless_one_kernel<<<blocks, kThreads, 0, stream>>>(grad, dtype, n, scale, vec);
}

void likelihood(const LikelihoodParams& p, cudaStream_t stream) {
  if (p.in.rows == 0 || p.in.cols == 0) return;
  const Launch l = plan(p.in);
  with_loss(p.in.loss, [&](auto loss) {
    likelihood_kernel<decltype(loss)::value><<<l.blocks, kThreads, 0, stream>>>(p, l.layout.threads_per_row,
                                                                                 l.vec_pred, l.vec_target);
  });
}

}  // namespace pyvae::cuda
