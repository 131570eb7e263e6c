// CUDA kernel of the reconstruction likelihoods (losses and, where asked, gradients in one pass;
// see LikelihoodParams). The unit of work is a segment: one column block
// (kLikelihoodColumnBlock columns) of one row (of a group of rows when logvar's gradient is summed
// over the batch), so a few long rows still fill the GPU. A segment is covered by
// threads_per_segment threads, each owning four consecutive columns at a time; each row's sum is a
// fixed-order shuffle tree written to partial[row, block] (the caller adds the blocks in order):
// deterministic, no atomics. dtypes are run-time switches (uniform, so no divergence), keeping one
// instantiation per loss and grouping.
#include <algorithm>

#include "../common/likelihood_math.h"
#include "common.cuh"
#include "likelihood.h"

namespace pyvae::cuda {
namespace {

// A segment: one column block of a group of kGroupRows consecutive rows (one row unless logvar's
// gradient is summed over row groups).
struct Segment {
  int64_t row_begin, block, col_begin, col_end;
  bool active;
};

template <int kGroupRows>
__device__ __forceinline__ Segment my_segment(const LikelihoodInputs& in, int threads_per_segment) {
  const int64_t blocks = column_blocks(in.cols);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * (kThreads / threads_per_segment) +
                        threadIdx.x / threads_per_segment;
  Segment s;
  s.active = index < row_groups(in.rows, kGroupRows) * blocks;
  s.row_begin = (index / blocks) * kGroupRows;
  s.block = index % blocks;
  s.col_begin = s.block * kLikelihoodColumnBlock;
  s.col_end = min(in.cols, s.col_begin + kLikelihoodColumnBlock);
  return s;
}

__device__ __forceinline__ void load_logvar4(const LikelihoodInputs& in, int64_t row, int64_t col, float out[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    out[k] = in.logvar != nullptr && col + k < in.cols ? in.logvar[row * in.logvar_row_stride + col + k]
                                                        : in.fixed_logvar;
}

// kGroupRows > 1: logvar's gradient is summed over each group's rows (in row order) into
// p.grad_logvar[group, :]; the rows of a group are walked inside each thread's column loop, so a
// thread adds the derivatives of its own columns and no two threads touch one sum.
template <Loss kLoss, int kGroupRows>
__global__ void __launch_bounds__(kThreads)
    likelihood_kernel(LikelihoodParams p, int threads_per_segment, bool vec_pred, bool vec_target) {
  const LikelihoodInputs& in = p.in;
  const Segment seg = my_segment<kGroupRows>(in, threads_per_segment);
  const int lane = threadIdx.x % threads_per_segment;
  const size_t pred_size = dtype_size(in.pred_dtype), target_size = dtype_size(in.target_dtype);
  const bool vec_out = in.cols % 4 == 0;  // fresh contiguous outputs
  float partial[kGroupRows];  // per row of the group
#pragma unroll
  for (int i = 0; i < kGroupRows; ++i) partial[i] = 0.0f;
  for (int64_t col = seg.col_begin + 4 * lane; seg.active && col < seg.col_end; col += 4 * threads_per_segment) {
    float logvar_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
    for (int i = 0; i < kGroupRows; ++i) {
      const int64_t row = seg.row_begin + i;
      if (row >= in.rows) break;
      const void* pred_row = static_cast<const char*>(in.pred) + row * in.pred_row_stride * pred_size;
      const void* target_row = static_cast<const char*>(in.target) + row * in.target_row_stride * target_size;
      const int64_t out_row = row * in.cols;  // offset of this row in the contiguous outputs
      float pred[4], target[4], logvar[4], value[4], d_pred[4], d_target[4], d_logvar[4];
      load4_dtype(in.pred_dtype, pred_row, col, seg.col_end, vec_pred, pred);
      load4_dtype(in.target_dtype, target_row, col, seg.col_end, vec_target, target);
      load_logvar4(in, row, col, logvar);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const bool inside = col + k < seg.col_end;
        const LossTerms t = loss_terms<kLoss>(pred[k], target[k], logvar[k], in.constant);
        value[k] = inside ? t.value : 0.0f;
        d_pred[k] = t.d_pred * p.grad_scale;
        d_target[k] = t.d_target * p.grad_scale;
        d_logvar[k] = t.d_logvar * p.grad_scale;
        logvar_sum[k] += d_logvar[k];
      }
      if (p.per_element) store4(p.loss + out_row, col, seg.col_end, vec_out, value);
      if (p.grad_pred != nullptr)
        store4_dtype(in.pred_dtype, static_cast<char*>(p.grad_pred) + out_row * pred_size, col, seg.col_end,
                     vec_out, d_pred);
      if (p.grad_target != nullptr)
        store4_dtype(in.target_dtype, static_cast<char*>(p.grad_target) + out_row * target_size, col, seg.col_end,
                     vec_out, d_target);
      if (kGroupRows == 1 && p.grad_logvar != nullptr) store4(p.grad_logvar + out_row, col, seg.col_end, vec_out, d_logvar);
      partial[i] += (value[0] + value[1]) + (value[2] + value[3]);
    }
    if (kGroupRows > 1 && p.grad_logvar != nullptr)
      store4(p.grad_logvar + (seg.row_begin / kGroupRows) * in.cols, col, seg.col_end, vec_out, logvar_sum);
  }
  if (p.per_element) return;  // uniform across the block
  const int64_t blocks = column_blocks(in.cols);
#pragma unroll 1
  for (int i = 0; i < kGroupRows; ++i) {  // every thread of the block takes part in each row_sum
    const float total = row_sum(partial[i], threads_per_segment);
    const int64_t row = seg.row_begin + i;
    if (seg.active && lane == 0 && row < in.rows) p.loss[row * blocks + seg.block] = total;
    if (kGroupRows > 1) __syncthreads();  // row_sum's shared scratch is reused by the next row
  }
}

struct Launch {
  RowLayout layout;
  unsigned blocks;
  bool vec_pred, vec_target;
};

Launch plan(const LikelihoodInputs& in, int64_t group_rows) {
  const int64_t segments = row_groups(in.rows, group_rows) * column_blocks(in.cols);
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
  const bool grouped = p.grad_logvar != nullptr && p.logvar_group_rows > 1;
  const Launch l = plan(p.in, grouped ? kLogvarGroupRows : 1);
  with_loss(p.in.loss, [&](auto loss) {
    if (grouped)
      likelihood_kernel<decltype(loss)::value, kLogvarGroupRows><<<l.blocks, kThreads, 0, stream>>>(
          p, l.layout.threads_per_row, l.vec_pred, l.vec_target);
    else
      likelihood_kernel<decltype(loss)::value, 1><<<l.blocks, kThreads, 0, stream>>>(p, l.layout.threads_per_row,
                                                                                     l.vec_pred, l.vec_target);
  });
}

}  // namespace pyvae::cuda
