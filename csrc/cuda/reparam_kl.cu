// CUDA kernels of reparameterize + KL. One thread owns a Philox group (four consecutive columns
// of a row) at a time; a row is covered by threads_per_row threads of one block, so the per-row
// KL sum is a fixed-order shuffle (+ shared-memory) tree: deterministic, no atomics.
#include "../common/philox.h"
#include "../common/reparam_kl_math.h"
#include "common.cuh"
#include "reparam_kl.h"

namespace pyvae::cuda {
namespace {

// The key of this call; the first thread of the grid records it for backward.
__device__ __forceinline__ uint64_t resolve_key(const SeedSource& s) {
  int64_t key = s.key;
  if (s.from_cuda_generator) {
    const uint64_t seed = s.captured ? static_cast<uint64_t>(*s.generator_seed_ptr) : s.generator_seed;
    const uint64_t offset = s.captured ? static_cast<uint64_t>(*s.generator_offset_ptr) + s.offset_intragraph
                                       : s.generator_offset;
    key = key_from_generator(seed, offset);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *s.key_out = key;
  return static_cast<uint64_t>(key);
}

// Elements [col, col + 4) of row r of a prior tensor (ReparamKLPrior): zeros where it is absent, the
// row's one value where it broadcasts along the row (col_stride 0), else load4.
template <typename T>
__device__ __forceinline__ void load4_prior(const void* base, int64_t row_stride, int64_t col_stride, int64_t r,
                                            int64_t col, int64_t cols, bool vec, float out[4]) {
  if (base == nullptr) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = 0.0f;
    return;
  }
  const T* row = static_cast<const T*>(base) + r * row_stride;
  if (col_stride == 0) {
    const float value = to_f32(row[0]);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = value;
    return;
  }
  load4(row, col, cols, vec, out);
}

// kPrior: the KL against `prior` (reparam_kl_math.h), else against N(0, I) with the code as it was.
template <typename T, bool kPrior>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(ReparamKLForwardParams p, ReparamKLPrior prior, int threads_per_row, bool vec_in, bool vec_out) {
  const int lane = threadIdx.x % threads_per_row;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / threads_per_row) + threadIdx.x / threads_per_row;
  const bool active = r < p.in.rows;
  const uint64_t seed = resolve_key(p.seed);
  const int64_t groups = (p.in.cols + 3) / 4;
  const T* mu_row = static_cast<const T*>(p.in.mu) + r * p.in.mu_row_stride;
  const T* logvar_row = static_cast<const T*>(p.in.logvar) + r * p.in.logvar_row_stride;
  float kl_partial = 0.0f;
  for (int64_t j = lane; active && j < groups; j += threads_per_row) {
    const int64_t col = 4 * j;
    float mu[4], logvar[4], sd[4], kl[4], z[4];
    load4(mu_row, col, p.in.cols, vec_in, mu);
    load4(logvar_row, col, p.in.cols, vec_in, logvar);
    if (p.in.clamp_logvar) {
#pragma unroll
      for (int k = 0; k < 4; ++k) logvar[k] = clamp_logvar(logvar[k], p.in.logvar_min, p.in.logvar_max);
    }
    if constexpr (kPrior) {
      float prior_mu[4], prior_logvar[4];
      load4_prior<T>(prior.mu, prior.mu_row_stride, prior.mu_col_stride, r, col, p.in.cols, prior.vec, prior_mu);
      load4_prior<T>(prior.logvar, prior.logvar_row_stride, prior.logvar_col_stride, r, col, p.in.cols, prior.vec,
                     prior_logvar);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        sd[k] = std_from_logvar(logvar[k]);
        kl[k] = col + k < p.in.cols ? kl_term_prior(mu[k], logvar[k], prior_mu[k], prior_logvar[k]) : 0.0f;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        sd[k] = std_from_logvar(logvar[k]);
        kl[k] = col + k < p.in.cols ? kl_term(mu[k], logvar[k], sd[k]) : 0.0f;
      }
    }
    kl_partial += (kl[0] + kl[1]) + (kl[2] + kl[3]);
    if (p.kl_per_element) store4(p.kl + r * p.in.cols, col, p.in.cols, vec_out, kl);
    for (int64_t s = 0; s < p.samples; ++s) {
      const Normal4 eps = normal4(seed, static_cast<uint64_t>(r * groups + j), static_cast<uint32_t>(s));
#pragma unroll
      for (int k = 0; k < 4; ++k) z[k] = mu[k] + sd[k] * eps.v[k];
      store4(static_cast<T*>(p.z) + (s * p.in.rows + r) * p.in.cols, col, p.in.cols, vec_out, z);
    }
  }
  if (p.kl_per_element) return;  // uniform across the block
  const float total = row_sum(kl_partial, threads_per_row);
  if (active && lane == 0) p.kl[r] = total;
}

// kPrior: with a prior and a KL gradient (p.grad_kl not null), which also gives the prior's gradients.
template <typename T, bool kPrior>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(ReparamKLBackwardParams p, ReparamKLPrior prior, ReparamKLPriorGrads prior_grads,
                    int threads_per_row, bool vec_in, bool vec_out, bool vec_gz, bool vec_grad) {
  const int lane = threadIdx.x % threads_per_row;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / threads_per_row) + threadIdx.x / threads_per_row;
  if (r >= p.in.rows) return;  // no block-wide sync below
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int64_t groups = (p.in.cols + 3) / 4;
  const T* mu_row = static_cast<const T*>(p.in.mu) + r * p.in.mu_row_stride;
  const T* logvar_row = static_cast<const T*>(p.in.logvar) + r * p.in.logvar_row_stride;
  const T* grad_z = static_cast<const T*>(p.grad_z);
  for (int64_t j = lane; j < groups; j += threads_per_row) {
    const int64_t col = 4 * j;
    float mu[4], logvar[4], logvar_raw[4], gz[4], gz_sum[4] = {}, gz_eps_sum[4] = {};
    load4(mu_row, col, p.in.cols, vec_in, mu);
    load4(logvar_row, col, p.in.cols, vec_in, logvar_raw);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      logvar[k] = p.in.clamp_logvar ? clamp_logvar(logvar_raw[k], p.in.logvar_min, p.in.logvar_max) : logvar_raw[k];
    if (grad_z != nullptr) {
      for (int64_t s = 0; s < p.samples; ++s) {
        const Normal4 eps = normal4(seed, static_cast<uint64_t>(r * groups + j), static_cast<uint32_t>(s));
        const T* gz_row = grad_z + s * p.grad_z_sample_stride + r * p.grad_z_row_stride;
        if (p.grad_z_col_stride == 1) {
          load4(gz_row, col, p.in.cols, vec_gz, gz);
        } else {  // an expanded gradient: one value along the row
#pragma unroll
          for (int k = 0; k < 4; ++k) gz[k] = to_f32(gz_row[0]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          gz_sum[k] += gz[k];
          gz_eps_sum[k] += gz[k] * eps.v[k];
        }
      }
    }
    float grad_mu[4], grad_logvar[4];
    if constexpr (kPrior) {
      float prior_mu[4], prior_logvar[4], grad_prior_mu[4], grad_prior_logvar[4];
      load4_prior<T>(prior.mu, prior.mu_row_stride, prior.mu_col_stride, r, col, p.in.cols, prior.vec, prior_mu);
      load4_prior<T>(prior.logvar, prior.logvar_row_stride, prior.logvar_col_stride, r, col, p.in.cols, prior.vec,
                     prior_logvar);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float gkl =
            col + k < p.in.cols ? p.grad_kl[r * p.grad_kl_row_stride + (col + k) * p.grad_kl_col_stride] : 0.0f;
        const PriorKLGrads d = prior_kl_grads(mu[k], logvar[k], prior_mu[k], prior_logvar[k]);
        const InputGrads g = input_grads_prior(grad_z != nullptr, d.mu, d.logvar, std_from_logvar(logvar[k]),
                                               gz_sum[k], gz_eps_sum[k], gkl);
        grad_mu[k] = g.mu;
        grad_logvar[k] = g.logvar;
        grad_prior_mu[k] = -(gkl * d.mu);
        grad_prior_logvar[k] = gkl * d.prior_logvar;
      }
      // float32 outputs, fresh contiguous allocations
      if (prior_grads.mu != nullptr) store4(prior_grads.mu + r * p.in.cols, col, p.in.cols, vec_out, grad_prior_mu);
      if (prior_grads.logvar != nullptr)
        store4(prior_grads.logvar + r * p.in.cols, col, p.in.cols, vec_out, grad_prior_logvar);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float gkl = p.grad_kl != nullptr && col + k < p.in.cols
                              ? p.grad_kl[r * p.grad_kl_row_stride + (col + k) * p.grad_kl_col_stride]
                              : 0.0f;
        const InputGrads g = input_grads(grad_z != nullptr, p.grad_kl != nullptr, mu[k], std_from_logvar(logvar[k]),
                                         gz_sum[k], gz_eps_sum[k], gkl);
        grad_mu[k] = g.mu;
        grad_logvar[k] = g.logvar;
      }
    }
    if (p.in.clamp_logvar) {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        grad_logvar[k] = clamp_passes_grad(logvar_raw[k], p.in.logvar_min, p.in.logvar_max) ? grad_logvar[k] : 0.0f;
    }
    store4(static_cast<T*>(p.grad_mu) + r * p.grad_mu_row_stride, col, p.in.cols, vec_grad, grad_mu);
    store4(static_cast<T*>(p.grad_logvar) + r * p.grad_logvar_row_stride, col, p.in.cols, vec_grad, grad_logvar);
  }
}

// Whether every present prior tensor that is read along the row (col_stride 1) allows packed loads.
template <typename T>
bool prior_packable(const ReparamKLPrior& prior, int64_t cols) {
  const auto ok = [&](const void* base, int64_t row_stride, int64_t col_stride) {
    return base == nullptr || col_stride == 0 || packable<T>(base, row_stride, cols);
  };
  return ok(prior.mu, prior.mu_row_stride, prior.mu_col_stride) &&
         ok(prior.logvar, prior.logvar_row_stride, prior.logvar_col_stride);
}

template <typename T>
void launch_forward(const ReparamKLForwardParams& p, const ReparamKLPrior& prior, cudaStream_t stream) {
  const RowLayout layout = row_layout(p.in.cols);
  const bool vec_in = packable<T>(p.in.mu, p.in.mu_row_stride, p.in.cols) && packable<T>(p.in.logvar, p.in.logvar_row_stride, p.in.cols);
  // z and kl are fresh contiguous allocations (256-byte aligned by the caching allocator).
  const bool vec_out = p.in.cols % 4 == 0;
  const int64_t blocks = (p.in.rows + layout.rows_per_block - 1) / layout.rows_per_block;
  ReparamKLPrior q = prior;
  q.vec = prior_packable<T>(prior, p.in.cols);
  if (prior.present) {
    forward_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, q, layout.threads_per_row,
                                                                                     vec_in, vec_out);
  } else {
    forward_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, q, layout.threads_per_row,
                                                                                      vec_in, vec_out);
  }
}

template <typename T>
void launch_backward(const ReparamKLBackwardParams& p, const ReparamKLPrior& prior,
                     const ReparamKLPriorGrads& prior_grads, cudaStream_t stream) {
  const RowLayout layout = row_layout(p.in.cols);
  const bool vec_in = packable<T>(p.in.mu, p.in.mu_row_stride, p.in.cols) && packable<T>(p.in.logvar, p.in.logvar_row_stride, p.in.cols);
  // the prior's float32 gradients: fresh contiguous allocations
  const bool vec_out = p.in.cols % 4 == 0;
  const bool vec_gz = p.grad_z != nullptr && p.grad_z_col_stride == 1 &&
                      packable<T>(p.grad_z, p.grad_z_row_stride, p.in.cols) && p.grad_z_sample_stride % 4 == 0;
  // grad_mu and grad_logvar: fresh allocations, or the two halves of the packed op's one output
  const bool vec_grad = packable<T>(p.grad_mu, p.grad_mu_row_stride, p.in.cols) &&
                        packable<T>(p.grad_logvar, p.grad_logvar_row_stride, p.in.cols);
  const int64_t blocks = (p.in.rows + layout.rows_per_block - 1) / layout.rows_per_block;
  ReparamKLPrior q = prior;
  q.vec = prior_packable<T>(prior, p.in.cols);
  if (prior.present && p.grad_kl != nullptr) {  // without a KL gradient the prior plays no part
    backward_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, q, prior_grads, layout.threads_per_row, vec_in, vec_out, vec_gz, vec_grad);
  } else {
    backward_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, q, prior_grads, layout.threads_per_row, vec_in, vec_out, vec_gz, vec_grad);
  }
}

}  // namespace

void reparam_kl_forward(const ReparamKLForwardParams& p, const ReparamKLPrior& prior, cudaStream_t stream) {
  if (p.in.rows == 0 || p.in.cols == 0) return;
  switch (p.in.dtype) {
    case DType::kFloat32: return launch_forward<float>(p, prior, stream);
    case DType::kFloat16: return launch_forward<__half>(p, prior, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(p, prior, stream);
  }
}

void reparam_kl_backward(const ReparamKLBackwardParams& p, const ReparamKLPrior& prior,
                         const ReparamKLPriorGrads& prior_grads, cudaStream_t stream) {
  if (p.in.rows == 0 || p.in.cols == 0) return;
  switch (p.in.dtype) {
    case DType::kFloat32: return launch_backward<float>(p, prior, prior_grads, stream);
    case DType::kFloat16: return launch_backward<__half>(p, prior, prior_grads, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(p, prior, prior_grads, stream);
  }
}

}  // namespace pyvae::cuda
