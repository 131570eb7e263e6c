// CUDA kernel of the discretized mixture of logistics (NLL and, where asked, its gradient in one
// pass; see DmolParams). A thread block owns one block of kDmolPositionBlock positions of one
// sample; each thread takes positions kThreads apart (consecutive threads, consecutive positions:
// coalesced reads of channels-first parameters) and walks the components twice: once for the
// log-sum-exp, again (recomputing, so nothing of size M is kept per thread) for the gradient. The
// block's sum is a fixed-order tree: deterministic, no atomics.
#include <math.h>

#include "../common/dmol_math.h"
#include "common.cuh"
#include "dmol.h"

namespace pyvae::cuda {
namespace {

struct DmolConsts {
  float half_bin, half_classes, last_class, log_half_classes;
  int64_t block;  // parameters per channel: 2M for one channel, 3M for three
};

template <typename TP>
struct ParamRow {
  const TP* base;
  int64_t stride;
  __device__ __forceinline__ float operator()(int64_t j) const { return to_f32(base[j * stride]); }
};

// The mean of channel c for component i, given the channels before it (and its tanh coefficients).
template <typename TP>
__device__ __forceinline__ float coupled_mean(const ParamRow<TP>& prm, const DmolConsts& k, int64_t M, int c,
                                              int64_t i, const float* xv, float* t) {
  const int64_t coef = M + 2 * M + i;  // channel 0's coefficient of component i; channel c's is c blocks on
  float mean = prm(M + c * k.block + i);
  if (c == 1) {
    t[0] = tanh_f(prm(coef));
    mean += t[0] * xv[0];
  } else if (c == 2) {
    t[1] = tanh_f(prm(coef + k.block));
    t[2] = tanh_f(prm(coef + 2 * k.block));
    mean += t[1] * xv[0] + t[2] * xv[1];
  }
  return mean;
}

// C (1 or 3) at compile time: the per-channel arrays stay in registers.
template <typename TP, typename TX, int C>
__device__ float dmol_position(const DmolParams& p, const DmolConsts& k, int64_t b, int64_t n) {
  const int64_t M = p.num_mix;
  const int64_t at = b * p.params_batch_stride + n * p.params_position_stride;
  const ParamRow<TP> prm{static_cast<const TP*>(p.params) + at, p.params_param_stride};
  const TX* xs = static_cast<const TX*>(p.x) + b * p.x_batch_stride + n * p.x_position_stride;
  float xv[3] = {0.0f, 0.0f, 0.0f}, klass[3];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    xv[c] = to_f32(xs[c * p.x_channel_stride]);
    klass[c] = dmol_class(xv[c], k.half_classes);
  }
  float top = -INFINITY, total = 0.0f;  // log-softmax of the logits
  for (int64_t i = 0; i < M; ++i) top = fmaxf(top, prm(i));
  for (int64_t i = 0; i < M; ++i) total += exp_f(prm(i) - top);
  const float log_norm = top + log_f(total);
  float t[3];
  float joint_top = -INFINITY, joint_total = 0.0f;  // online log-sum-exp of the joint log-probabilities
  for (int64_t i = 0; i < M; ++i) {
    float joint = prm(i) - log_norm;
#pragma unroll
    for (int c = 0; c < C; ++c)
      joint += dmol_bin_terms(xv[c] - coupled_mean(prm, k, M, c, i, xv, t), prm(M + c * k.block + M + i), klass[c],
                              k.last_class, k.half_bin, k.log_half_classes).log_prob;
    if (joint > joint_top) {
      joint_total = joint_total * exp_f(joint_top - joint) + 1.0f;
      joint_top = joint;
    } else {
      joint_total += exp_f(joint - joint_top);
    }
  }
  const float nll = -(joint_top + log_f(joint_total));
  if (p.grad == nullptr) return nll;
  TP* g = static_cast<TP*>(p.grad) + at;
  const int64_t gs = p.params_param_stride;
  for (int64_t i = 0; i < M; ++i) {
    DmolBinTerms terms[C];
    float joint = prm(i) - log_norm, d_mean_g = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      terms[c] = dmol_bin_terms(xv[c] - coupled_mean(prm, k, M, c, i, xv, t), prm(M + c * k.block + M + i), klass[c],
                                k.last_class, k.half_bin, k.log_half_classes);
      joint += terms[c].log_prob;
    }
    const float weight = exp_f(joint + nll) * p.grad_scale;  // the posterior of component i, scaled
    g[i * gs] = from_f32<TP>(exp_f(prm(i) - log_norm) * p.grad_scale - weight);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float d_mean = weight * terms[c].d_centered;
      g[(M + c * k.block + i) * gs] = from_f32<TP>(d_mean);
      g[(M + c * k.block + M + i) * gs] = from_f32<TP>(-weight * terms[c].d_log_scale);
      const int64_t coef = M + 2 * M + i;
      if (c == 1) {
        d_mean_g = d_mean;
      } else if (c == 2) {
        g[coef * gs] = from_f32<TP>(d_mean_g * xv[0] * (1.0f - t[0] * t[0]));
        g[(coef + k.block) * gs] = from_f32<TP>(d_mean * xv[0] * (1.0f - t[1] * t[1]));
        g[(coef + 2 * k.block) * gs] = from_f32<TP>(d_mean * xv[1] * (1.0f - t[2] * t[2]));
      }
    }
  }
  return nll;
}

template <typename TP, typename TX, int C>
__global__ void __launch_bounds__(kThreads) dmol_kernel(const DmolParams p, const DmolConsts k) {
  const int64_t b = blockIdx.y, first = static_cast<int64_t>(blockIdx.x) * kDmolPositionBlock;
  const int64_t last = min(p.positions, first + kDmolPositionBlock);
  float partial = 0.0f;
  for (int64_t n = first + threadIdx.x; n < last; n += kThreads) {
    const float nll = dmol_position<TP, TX, C>(p, k, b, n);
    if (p.per_position) {
      p.nll[b * p.positions + n] = nll;
    } else {
      partial += nll;
    }
  }
  if (p.per_position) return;
  const float sum = row_sum(partial, kThreads);  // every thread calls: kThreads threads per "row"
  if (threadIdx.x == 0) p.nll[b * gridDim.x + blockIdx.x] = sum;
}

template <typename TP, int C>
void launch_for_x(const DmolParams& p, const DmolConsts& k, dim3 grid, cudaStream_t stream) {
  switch (p.x_dtype) {
    case DType::kFloat32: return dmol_kernel<TP, float, C><<<grid, kThreads, 0, stream>>>(p, k);
    case DType::kFloat16: return dmol_kernel<TP, __half, C><<<grid, kThreads, 0, stream>>>(p, k);
    case DType::kBFloat16: return dmol_kernel<TP, __nv_bfloat16, C><<<grid, kThreads, 0, stream>>>(p, k);
  }
}

template <typename TP>
void launch_for_channels(const DmolParams& p, const DmolConsts& k, dim3 grid, cudaStream_t stream) {
  if (p.channels == 3) return launch_for_x<TP, 3>(p, k, grid, stream);
  return launch_for_x<TP, 1>(p, k, grid, stream);
}

template <typename TP, int C>
__global__ void __launch_bounds__(kThreads) dmol_sample_kernel(const DmolSampleParams p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= p.batch * p.positions) return;
  const int64_t b = index / p.positions, n = index % p.positions;
  const ParamRow<TP> param{static_cast<const TP*>(p.params) + b * p.params_batch_stride + n * p.params_position_stride,
                           p.params_param_stride};
  float out[C];
  dmol_sample_position<C>(param, p.num_mix, C == 3 ? 3 * p.num_mix : 2 * p.num_mix, static_cast<uint64_t>(*p.seed),
                          static_cast<uint64_t>(index), p.temperature, out);
  float* x = p.x + b * p.x_batch_stride + n * p.x_position_stride;
#pragma unroll
  for (int c = 0; c < C; ++c) x[c * p.x_channel_stride] = out[c];
}

}  // namespace

void dmol_sample(const DmolSampleParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.batch * p.positions + kThreads - 1) / kThreads);
  const bool rgb = p.channels == 3;
  switch (p.params_dtype) {
    case DType::kFloat32:
      return rgb ? dmol_sample_kernel<float, 3><<<blocks, kThreads, 0, stream>>>(p)
                 : dmol_sample_kernel<float, 1><<<blocks, kThreads, 0, stream>>>(p);
    case DType::kFloat16:
      return rgb ? dmol_sample_kernel<__half, 3><<<blocks, kThreads, 0, stream>>>(p)
                 : dmol_sample_kernel<__half, 1><<<blocks, kThreads, 0, stream>>>(p);
    case DType::kBFloat16:
      return rgb ? dmol_sample_kernel<__nv_bfloat16, 3><<<blocks, kThreads, 0, stream>>>(p)
                 : dmol_sample_kernel<__nv_bfloat16, 1><<<blocks, kThreads, 0, stream>>>(p);
  }
}

void dmol(const DmolParams& p, cudaStream_t stream) {
  const DmolConsts k{1.0f / static_cast<float>(p.num_classes - 1), 0.5f * static_cast<float>(p.num_classes - 1),
                     static_cast<float>(p.num_classes - 1),
                     static_cast<float>(log(0.5 * static_cast<double>(p.num_classes - 1))),
                     p.channels == 3 ? 3 * p.num_mix : 2 * p.num_mix};
  const dim3 grid(static_cast<unsigned>(dmol_position_blocks(p.positions)), static_cast<unsigned>(p.batch));
  switch (p.params_dtype) {
    case DType::kFloat32: return launch_for_channels<float>(p, k, grid, stream);
    case DType::kFloat16: return launch_for_channels<__half>(p, k, grid, stream);
    case DType::kBFloat16: return launch_for_channels<__nv_bfloat16>(p, k, grid, stream);
  }
}

}  // namespace pyvae::cuda
