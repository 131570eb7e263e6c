// CPU kernels of reparameterize + KL. Rows are split across torch's intra-op threads; each row is
// processed in chunks of kChunk columns held in small float buffers (chunk.h), so the noise
// generation and the element math run as straight-line loops that g++ vectorises.
#include "reparam_kl.h"

#include <ATen/Parallel.h>
#include <algorithm>

#include "../common/philox.h"
#include "../common/reparam_kl_math.h"
#include "chunk.h"
#include "philox_batch.h"

namespace pyvae::cpu {
namespace {


PYVAE_MULTIVERSION void box_muller(const uint32_t* __restrict w0, const uint32_t* __restrict w1,
                                   const uint32_t* __restrict w2, const uint32_t* __restrict w3, int64_t n_groups,
                                   float* __restrict eps) {
#pragma omp simd
  for (int64_t j = 0; j < n_groups; ++j) {
    const Normal4 n = normals_from_bits(Philox4{{w0[j], w1[j], w2[j], w3[j]}});
    eps[4 * j + 0] = n.v[0];
    eps[4 * j + 1] = n.v[1];
    eps[4 * j + 2] = n.v[2];
    eps[4 * j + 3] = n.v[3];
  }
}

// eps of groups [group0, group0 + n_groups) (n_groups <= kChunk / 4): 4 * n_groups floats.
void normals(uint64_t seed, uint64_t group0, uint32_t sample, int64_t n_groups, float* __restrict eps) {
  alignas(64) uint32_t words[4][kChunk / 4];
  static_assert(kChunk % 4 == 0, "a chunk holds whole Philox groups");
  philox_words(seed, group0, sample, n_groups, PhiloxWords{{words[0], words[1], words[2], words[3]}});
  box_muller(words[0], words[1], words[2], words[3], n_groups, eps);
}

// How the packed ops' clamp bounds the log-variance: not at all (the unpacked ops), to bounds of
// any size, or to bounds inside [-kStdNormalLogvar, kStdNormalLogvar] (diffusers' [-30, 20]), where
// std_from_bounded_logvar saves about a tenth of the forward's time (reparam_kl_math.h).
enum class LogvarClamp { kNone, kAny, kBounded };

LogvarClamp logvar_clamp(const ReparamKLInputs& in) {
  if (!in.clamp_logvar) return LogvarClamp::kNone;
  const bool bounded = in.logvar_min >= -kStdNormalLogvar && in.logvar_max <= kStdNormalLogvar;
  return bounded ? LogvarClamp::kBounded : LogvarClamp::kAny;
}

template <LogvarClamp kClamp>
inline __attribute__((always_inline)) float std_of(float logvar) {
  return kClamp == LogvarClamp::kBounded ? std_from_bounded_logvar(logvar) : std_from_logvar(logvar);
}

// z = mu + std * eps and the KL terms of one chunk of a row, in one pass (logvar already clamped).
template <LogvarClamp kClamp>
inline __attribute__((always_inline)) void z_and_kl_loop(const float* __restrict mu, const float* __restrict logvar,
                                                         const float* __restrict eps, int64_t n, float* __restrict z,
                                                         float* __restrict kl) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float sd = std_of<kClamp>(logvar[c]);
    z[c] = mu[c] + sd * eps[c];
    kl[c] = kl_term(mu[c], logvar[c], sd);
  }
}

PYVAE_MULTIVERSION void z_and_kl(LogvarClamp clamp, const float* __restrict mu, const float* __restrict logvar,
                                 const float* __restrict eps, int64_t n, float* __restrict z,
                                 float* __restrict kl) {
  if (clamp == LogvarClamp::kBounded) return z_and_kl_loop<LogvarClamp::kBounded>(mu, logvar, eps, n, z, kl);
  z_and_kl_loop<LogvarClamp::kNone>(mu, logvar, eps, n, z, kl);
}

// The same with a Gaussian prior (reparam_kl_math.h): a separate loop, so that the prior-free one
// above stays as it was.
PYVAE_MULTIVERSION void z_and_kl_prior(const float* __restrict mu, const float* __restrict logvar,
                                       const float* __restrict prior_mu, const float* __restrict prior_logvar,
                                       const float* __restrict eps, int64_t n, float* __restrict z,
                                       float* __restrict kl) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    z[c] = mu[c] + std_from_logvar(logvar[c]) * eps[c];
    kl[c] = kl_term_prior(mu[c], logvar[c], prior_mu[c], prior_logvar[c]);
  }
}

// The backward of one chunk: grad_mu and grad_logvar (input_grads) in place of the two sums.
// The flags are template constants so that the loop vectorises (as run-time flags inside it, they
// stopped g++ vectorising it).
template <bool kHasGradZ, bool kHasGradKL>
inline __attribute__((always_inline)) void grads_loop(const float* __restrict mu, const float* __restrict logvar,
                                                      const float* __restrict gkl, int64_t n, float* __restrict gz_sum,
                                                      float* __restrict gz_eps_sum) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const InputGrads g =
        input_grads(kHasGradZ, kHasGradKL, mu[c], std_from_logvar(logvar[c]), gz_sum[c], gz_eps_sum[c], gkl[c]);
    gz_sum[c] = g.mu;
    gz_eps_sum[c] = g.logvar;
  }
}

PYVAE_MULTIVERSION void grads(bool has_grad_z, bool has_grad_kl, const float* __restrict mu,
                              const float* __restrict logvar, const float* __restrict gkl, int64_t n,
                              float* __restrict gz_sum, float* __restrict gz_eps_sum) {
  if (has_grad_z && has_grad_kl) return grads_loop<true, true>(mu, logvar, gkl, n, gz_sum, gz_eps_sum);
  if (has_grad_z) return grads_loop<true, false>(mu, logvar, gkl, n, gz_sum, gz_eps_sum);
  grads_loop<false, true>(mu, logvar, gkl, n, gz_sum, gz_eps_sum);
}

// The packed ops' clamp (reparam_kl_math.h) of one chunk of log-variances, into `clamped`.
PYVAE_MULTIVERSION void clamp_chunk(const float* __restrict logvar, int64_t n, float lo, float hi,
                                    float* __restrict clamped) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) clamped[c] = clamp_logvar(logvar[c], lo, hi);
}

// Zeroes the log-variance gradients of one chunk where the clamp passes none (a select, so that an
// infinite or NaN gradient there becomes 0, as torch.clamp's backward makes it).
PYVAE_MULTIVERSION void mask_clamped(const float* __restrict logvar, int64_t n, float lo, float hi,
                                     float* __restrict grad_logvar) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) grad_logvar[c] = clamp_passes_grad(logvar[c], lo, hi) ? grad_logvar[c] : 0.0f;
}

// The backward of one chunk of one sample without a prior (a posterior's, the common case) in one
// loop: grad_mu and grad_logvar straight from the upstream gradients gz and gkl, the noise and the
// raw log-variance, clamped first where kClamp (the packed ops); the general path's zeroed sums,
// accumulation and clamp were three more passes over a chunk. The clamp's mask stays a pass of its
// own (one_sample_grads): as a select in this loop, it changed how g++ contracted the gradient's
// products into FMAs, and the packed op no longer matched the chunked call bit for bit.
template <bool kHasGradZ, bool kHasGradKL, LogvarClamp kClamp>
inline __attribute__((always_inline)) void one_sample_grads_loop(
    const float* __restrict mu, const float* __restrict logvar, const float* __restrict gz,
    const float* __restrict eps, const float* __restrict gkl, int64_t n, float lo, float hi,
    float* __restrict grad_mu, float* __restrict grad_logvar) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float lv = kClamp != LogvarClamp::kNone ? clamp_logvar(logvar[c], lo, hi) : logvar[c];
    const float gz_c = kHasGradZ ? gz[c] : 0.0f;
    const InputGrads g = input_grads(kHasGradZ, kHasGradKL, mu[c], std_of<kClamp>(lv), gz_c,
                                     kHasGradZ ? gz_c * eps[c] : 0.0f, kHasGradKL ? gkl[c] : 0.0f);
    grad_mu[c] = g.mu;
    grad_logvar[c] = g.logvar;
  }
}

template <LogvarClamp kClamp>
inline __attribute__((always_inline)) void one_sample_grads_clamp(
    bool has_grad_z, bool has_grad_kl, const float* __restrict mu, const float* __restrict logvar,
    const float* __restrict gz, const float* __restrict eps, const float* __restrict gkl, int64_t n, float lo,
    float hi, float* __restrict grad_mu, float* __restrict grad_logvar) {
  if (has_grad_z && has_grad_kl)
    return one_sample_grads_loop<true, true, kClamp>(mu, logvar, gz, eps, gkl, n, lo, hi, grad_mu, grad_logvar);
  if (has_grad_z)
    return one_sample_grads_loop<true, false, kClamp>(mu, logvar, gz, eps, gkl, n, lo, hi, grad_mu, grad_logvar);
  one_sample_grads_loop<false, true, kClamp>(mu, logvar, gz, eps, gkl, n, lo, hi, grad_mu, grad_logvar);
}

PYVAE_MULTIVERSION void one_sample_grads(bool has_grad_z, bool has_grad_kl, LogvarClamp clamp,
                                         const float* __restrict mu, const float* __restrict logvar,
                                         const float* __restrict gz, const float* __restrict eps,
                                         const float* __restrict gkl, int64_t n, float lo, float hi,
                                         float* __restrict grad_mu, float* __restrict grad_logvar) {
  switch (clamp) {
    case LogvarClamp::kNone:
      return one_sample_grads_clamp<LogvarClamp::kNone>(has_grad_z, has_grad_kl, mu, logvar, gz, eps, gkl, n, lo, hi,
                                                        grad_mu, grad_logvar);
    case LogvarClamp::kAny:
      one_sample_grads_clamp<LogvarClamp::kAny>(has_grad_z, has_grad_kl, mu, logvar, gz, eps, gkl, n, lo, hi, grad_mu,
                                                grad_logvar);
      break;
    case LogvarClamp::kBounded:
      one_sample_grads_clamp<LogvarClamp::kBounded>(has_grad_z, has_grad_kl, mu, logvar, gz, eps, gkl, n, lo, hi,
                                                    grad_mu, grad_logvar);
      break;
  }
  mask_clamped(logvar, n, lo, hi, grad_logvar);
}

// The backward of one chunk with a prior and a KL gradient: grad_mu and grad_logvar in place of
// the two sums, and the prior's per-element gradients into d_prior_mu and d_prior_logvar.
template <bool kHasGradZ>
inline __attribute__((always_inline)) void prior_grads_loop(
    const float* __restrict mu, const float* __restrict logvar, const float* __restrict prior_mu,
    const float* __restrict prior_logvar, const float* __restrict gkl, int64_t n, float* __restrict gz_sum,
    float* __restrict gz_eps_sum, float* __restrict d_prior_mu, float* __restrict d_prior_logvar) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const PriorKLGrads d = prior_kl_grads(mu[c], logvar[c], prior_mu[c], prior_logvar[c]);
    const InputGrads g =
        input_grads_prior(kHasGradZ, d.mu, d.logvar, std_from_logvar(logvar[c]), gz_sum[c], gz_eps_sum[c], gkl[c]);
    gz_sum[c] = g.mu;
    gz_eps_sum[c] = g.logvar;
    d_prior_mu[c] = -(gkl[c] * d.mu);
    d_prior_logvar[c] = gkl[c] * d.prior_logvar;
  }
}

PYVAE_MULTIVERSION void chunk_prior_grads(bool has_grad_z, const float* __restrict mu,
                                          const float* __restrict logvar, const float* __restrict prior_mu,
                                          const float* __restrict prior_logvar, const float* __restrict gkl,
                                          int64_t n, float* __restrict gz_sum, float* __restrict gz_eps_sum,
                                          float* __restrict d_prior_mu, float* __restrict d_prior_logvar) {
  if (has_grad_z)
    return prior_grads_loop<true>(mu, logvar, prior_mu, prior_logvar, gkl, n, gz_sum, gz_eps_sum, d_prior_mu,
                                  d_prior_logvar);
  prior_grads_loop<false>(mu, logvar, prior_mu, prior_logvar, gkl, n, gz_sum, gz_eps_sum, d_prior_mu,
                          d_prior_logvar);
}

// Columns [col0, col0 + n) of row r of a prior tensor (ReparamKLPrior) as floats: `zeros` where it
// is absent, the value repeated where it broadcasts along the row, else as_float.
template <typename T>
const float* prior_chunk(const void* base, int64_t row_stride, int64_t col_stride, int64_t r, int64_t col0,
                         int64_t n, float* __restrict buffer, const float* zeros) {
  if (base == nullptr) return zeros;
  const T* src = static_cast<const T*>(base) + r * row_stride + col0 * col_stride;
  if (col_stride == 0) {
    std::fill(buffer, buffer + n, static_cast<float>(src[0]));
    return buffer;
  }
  return as_float(src, n, buffer);
}

// Asks for columns [col0, col0 + n) of rows [r0, r0 + nr). Called before the noise of a chunk is
// generated, which does not need the inputs, so the memory reads overlap that arithmetic.
template <typename T>
void prefetch_rows(const T* base, int64_t row_stride, int64_t r0, int64_t nr, int64_t col0, int64_t n) {
  for (int64_t i = 0; i < nr; ++i) prefetch_span(base + (r0 + i) * row_stride + col0, n * sizeof(T));
}

// A plain loop, not a memmove call (g++ would turn the loop into one: hence the attribute): the
// copies here are mostly of short rows (4 floats, say), where the call costs more than the copy.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) inline void copy_floats(
    const float* __restrict src, int64_t n, float* __restrict dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
}

// Scratch floats to their output, converting to T (float32 too: store_chunk assumes that a float32
// output was itself the scratch, float_target's).
template <typename T>
void copy_chunk(const float* __restrict src, int64_t n, T* __restrict dst) {
  if constexpr (std::is_same_v<T, float>) {
    copy_floats(src, n, dst);
  } else {
    store_chunk(src, n, dst);
  }
}

// ---------------------------------------------------------------------------- short rows
// Rows shorter than half a chunk are taken several to a block (RowBlocks). Their element math then
// runs once over the whole block, its rows gathered side by side into scratch (nr * cols floats, at
// most kChunk): called row by row, a 4-column row (a channels-last latent's, or a small Z's) cost
// about five times what a long row's elements cost.

// Rows [r0, r0 + nr) of `cols` values each, row r at base + r * row_stride, as nr * cols adjacent
// floats: the memory itself for adjacent float32 rows, else converted / gathered into `buffer`.
template <typename T>
const float* block_rows(const T* base, int64_t row_stride, int64_t r0, int64_t nr, int64_t cols,
                        float* __restrict buffer) {
  if (nr == 1 || row_stride == cols) return as_float(base + r0 * row_stride, nr * cols, buffer);
  for (int64_t i = 0; i < nr; ++i) {
    const float* row = as_float(base + (r0 + i) * row_stride, cols, buffer + i * cols);
    if (row != buffer + i * cols) copy_floats(row, cols, buffer + i * cols);
  }
  return buffer;
}

// The same rows of an upstream gradient with a column stride of its own (0 where it is expanded
// along the row, as a per-sample KL's gradient is).
template <typename T>
const float* block_rows_strided(const T* base, int64_t row_stride, int64_t col_stride, int64_t r0, int64_t nr,
                                int64_t cols, float* __restrict buffer) {
  if (col_stride == 1) return block_rows(base, row_stride, r0, nr, cols, buffer);
  if (col_stride == 0) {
    for (int64_t i = 0; i < nr; ++i)
      std::fill(buffer + i * cols, buffer + (i + 1) * cols, static_cast<float>(base[(r0 + i) * row_stride]));
    return buffer;
  }
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t c = 0; c < cols; ++c)
      buffer[i * cols + c] = static_cast<float>(base[(r0 + i) * row_stride + c * col_stride]);
  return buffer;
}

// The block's noise with its rows side by side: normals() leaves each row's whole Philox groups,
// 4 * groups_per_row values, so rows whose length is not a multiple of 4 are compacted.
inline const float* block_eps(const float* eps, int64_t eps_row_stride, int64_t nr, int64_t cols,
                              float* __restrict buffer) {
  if (nr == 1 || eps_row_stride == cols) return eps;
  for (int64_t i = 0; i < nr; ++i) copy_floats(eps + i * eps_row_stride, cols, buffer + i * cols);
  return buffer;
}

// Work is split into blocks of rows. Short rows (4 * groups_per_row <= kChunk) are taken several
// at a time, so that one normals() call covers all their Philox groups (contiguous counters) and
// fills whole SIMD vectors; long rows are taken one at a time and walked in kChunk-column chunks.
struct RowBlocks {
  int64_t groups_per_row, rows_per_block, count, grain;

  RowBlocks(int64_t rows, int64_t cols) {
    groups_per_row = (cols + 3) / 4;
    rows_per_block = std::max<int64_t>(1, kChunk / (4 * groups_per_row));
    count = (rows + rows_per_block - 1) / rows_per_block;
    grain = std::max<int64_t>(1, 32768 / (rows_per_block * cols));  // about 32k elements per task
  }
};

template <typename T>
void forward_impl(const ReparamKLForwardParams& p, const ReparamKLPrior& prior) {
  const T* mu = static_cast<const T*>(p.in.mu);
  const T* logvar = static_cast<const T*>(p.in.logvar);
  T* z = static_cast<T*>(p.z);
  const uint64_t seed = static_cast<uint64_t>(p.seed.key);  // the host resolved it (csrc/reparam_kl_ops.cpp)
  const RowBlocks blocks(p.in.rows, p.in.cols);
  const LogvarClamp clamp = logvar_clamp(p.in);
  const int64_t eps_row_stride = 4 * blocks.groups_per_row;
  at::parallel_for(0, blocks.count, blocks.grain, [&](int64_t block_begin, int64_t block_end) {
    alignas(64) float mu_buf[kChunk], logvar_buf[kChunk], kl_buf[kChunk], eps[kChunk], z_buf[kChunk],
        prior_mu_buf[kChunk], prior_logvar_buf[kChunk], zeros[kChunk] = {}, clamped_buf[kChunk], eps_compact[kChunk];
    float lanes[kChunk / 4][kLanes];
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t r0 = b * blocks.rows_per_block;
      const int64_t nr = std::min(blocks.rows_per_block, p.in.rows - r0);
      std::fill(&lanes[0][0], &lanes[0][0] + nr * kLanes, 0.0f);
      for (int64_t col0 = 0; col0 < p.in.cols; col0 += kChunk) {
        const int64_t n = std::min(kChunk, p.in.cols - col0);
        const uint64_t first_group = static_cast<uint64_t>(r0 * blocks.groups_per_row + col0 / 4);
        const int64_t n_groups = (nr - 1) * blocks.groups_per_row + (n + 3) / 4;
        prefetch_rows(mu, p.in.mu_row_stride, r0, nr, col0, n);
        prefetch_rows(logvar, p.in.logvar_row_stride, r0, nr, col0, n);
        if (nr > 1 && !prior.present) {  // short rows: the block at once (n == cols)
          const float* mu_f = block_rows(mu, p.in.mu_row_stride, r0, nr, n, mu_buf);
          const float* logvar_f = block_rows(logvar, p.in.logvar_row_stride, r0, nr, n, logvar_buf);
          if (p.in.clamp_logvar) {
            clamp_chunk(logvar_f, nr * n, p.in.logvar_min, p.in.logvar_max, clamped_buf);
            logvar_f = clamped_buf;
          }
          for (int64_t s = 0; s < p.samples; ++s) {
            normals(seed, first_group, static_cast<uint32_t>(s), n_groups, eps);
            float* kl_f = p.kl_per_element && s == 0 ? p.kl + r0 * p.in.cols : kl_buf;
            T* z_block = z + (s * p.in.rows + r0) * p.in.cols;
            float* z_f = float_target(z_block, z_buf);
            z_and_kl(clamp, mu_f, logvar_f, block_eps(eps, eps_row_stride, nr, n, eps_compact), nr * n, z_f, kl_f);
            store_chunk(z_f, nr * n, z_block);
            if (s == 0 && !p.kl_per_element)
              for (int64_t i = 0; i < nr; ++i) accumulate_lanes(kl_f + i * n, n, lanes[i]);
          }
          continue;
        }
        for (int64_t s = 0; s < p.samples; ++s) {
          normals(seed, first_group, static_cast<uint32_t>(s), n_groups, eps);
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = r0 + i;
            const float* mu_f = as_float(mu + r * p.in.mu_row_stride + col0, n, mu_buf);
            const float* logvar_f = as_float(logvar + r * p.in.logvar_row_stride + col0, n, logvar_buf);
            if (p.in.clamp_logvar) {
              clamp_chunk(logvar_f, n, p.in.logvar_min, p.in.logvar_max, clamped_buf);
              logvar_f = clamped_buf;
            }
            float* kl_f = p.kl_per_element && s == 0 ? p.kl + r * p.in.cols + col0 : kl_buf;
            T* z_row = z + (s * p.in.rows + r) * p.in.cols + col0;
            float* z_f = float_target(z_row, z_buf);
            if (prior.present) {
              const float* prior_mu_f = prior_chunk<T>(prior.mu, prior.mu_row_stride, prior.mu_col_stride, r, col0,
                                                       n, prior_mu_buf, zeros);
              const float* prior_logvar_f = prior_chunk<T>(prior.logvar, prior.logvar_row_stride,
                                                           prior.logvar_col_stride, r, col0, n, prior_logvar_buf, zeros);
              z_and_kl_prior(mu_f, logvar_f, prior_mu_f, prior_logvar_f, eps + i * eps_row_stride, n, z_f, kl_f);
            } else {
              z_and_kl(clamp, mu_f, logvar_f, eps + i * eps_row_stride, n, z_f, kl_f);
            }
            store_chunk(z_f, n, z_row);
            if (s == 0 && !p.kl_per_element) accumulate_lanes(kl_f, n, lanes[i]);
          }
        }
      }
      if (!p.kl_per_element)
        for (int64_t i = 0; i < nr; ++i) p.kl[r0 + i] = sum_lanes(lanes[i]);
    }
  });
}

template <typename T>
void backward_impl(const ReparamKLBackwardParams& p, const ReparamKLPrior& prior,
                   const ReparamKLPriorGrads& prior_grads) {
  const T* mu = static_cast<const T*>(p.in.mu);
  const T* logvar = static_cast<const T*>(p.in.logvar);
  const T* grad_z = static_cast<const T*>(p.grad_z);
  T* grad_mu = static_cast<T*>(p.grad_mu);
  T* grad_logvar = static_cast<T*>(p.grad_logvar);
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const RowBlocks blocks(p.in.rows, p.in.cols);
  const LogvarClamp clamp = logvar_clamp(p.in);
  const int64_t eps_row_stride = 4 * blocks.groups_per_row;
  const bool with_prior = prior.present && p.grad_kl != nullptr;  // without a KL gradient it plays no part
  const bool one_sample = p.samples == 1 && !with_prior;            // one_sample_grads, no sums
  at::parallel_for(0, blocks.count, blocks.grain, [&](int64_t block_begin, int64_t block_end) {
    alignas(64) float mu_buf[kChunk], logvar_buf[kChunk], gz_buf[kChunk], eps[kChunk], gz_sum_buf[kChunk],
        gz_eps_sum_buf[kChunk], gkl[kChunk], gkl_zeros[kChunk] = {}, prior_mu_buf[kChunk], prior_logvar_buf[kChunk],
        d_prior_mu_buf[kChunk], d_prior_logvar_buf[kChunk], clamped_buf[kChunk], eps_compact[kChunk];
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t r0 = b * blocks.rows_per_block;
      const int64_t nr = std::min(blocks.rows_per_block, p.in.rows - r0);
      for (int64_t col0 = 0; col0 < p.in.cols; col0 += kChunk) {
        const int64_t n = std::min(kChunk, p.in.cols - col0);
        // Sums over samples of grad_z and grad_z * eps, row i of the block at offset i * n, turned into
        // grad_mu and grad_logvar in place (one_sample: the gradients, written once). Where the rows of
        // a block are contiguous in the outputs (one row, or whole rows of unit row stride cols), the
        // float32 outputs themselves serve.
        T* grad_mu_out = grad_mu + r0 * p.grad_mu_row_stride + col0;
        T* grad_logvar_out = grad_logvar + r0 * p.grad_logvar_row_stride + col0;
        const bool rows_adjacent =
            nr == 1 || (p.grad_mu_row_stride == p.in.cols && p.grad_logvar_row_stride == p.in.cols);
        float* gz_sum = rows_adjacent ? float_target(grad_mu_out, gz_sum_buf) : gz_sum_buf;
        float* gz_eps_sum = rows_adjacent ? float_target(grad_logvar_out, gz_eps_sum_buf) : gz_eps_sum_buf;
        const uint64_t first_group = static_cast<uint64_t>(r0 * blocks.groups_per_row + col0 / 4);
        const int64_t n_groups = (nr - 1) * blocks.groups_per_row + (n + 3) / 4;
        if (one_sample) {  // the block's rows side by side (one row, or short ones with n == cols)
          prefetch_rows(mu, p.in.mu_row_stride, r0, nr, col0, n);
          prefetch_rows(logvar, p.in.logvar_row_stride, r0, nr, col0, n);
          const float* gz_f = nullptr;
          const float* eps_f = nullptr;
          if (grad_z != nullptr) {
            if (p.grad_z_col_stride == 1) prefetch_rows(grad_z, p.grad_z_row_stride, r0, nr, col0, n);
            normals(seed, first_group, 0u, n_groups, eps);
            eps_f = block_eps(eps, eps_row_stride, nr, n, eps_compact);
            gz_f = block_rows_strided(grad_z + col0 * p.grad_z_col_stride, p.grad_z_row_stride, p.grad_z_col_stride,
                                      r0, nr, n, gz_buf);
          }
          const float* gkl_f = p.grad_kl == nullptr
                                   ? gkl_zeros
                                   : block_rows_strided(p.grad_kl + col0 * p.grad_kl_col_stride, p.grad_kl_row_stride,
                                                        p.grad_kl_col_stride, r0, nr, n, gkl);
          one_sample_grads(grad_z != nullptr, p.grad_kl != nullptr, clamp,
                           block_rows(mu + col0, p.in.mu_row_stride, r0, nr, n, mu_buf),
                           block_rows(logvar + col0, p.in.logvar_row_stride, r0, nr, n, logvar_buf), gz_f, eps_f,
                           gkl_f, nr * n, p.in.logvar_min, p.in.logvar_max, gz_sum, gz_eps_sum);
        } else {  // sums over the samples
          std::fill(gz_sum, gz_sum + nr * n, 0.0f);
          std::fill(gz_eps_sum, gz_eps_sum + nr * n, 0.0f);
          if (nr > 1 && !with_prior) {  // short rows: the block at once (n == cols)
            for (int64_t s = 0; grad_z != nullptr && s < p.samples; ++s) {
              normals(seed, first_group, static_cast<uint32_t>(s), n_groups, eps);
              const float* eps_f = block_eps(eps, eps_row_stride, nr, n, eps_compact);
              const float* gz_f = block_rows_strided(grad_z + s * p.grad_z_sample_stride, p.grad_z_row_stride,
                                                     p.grad_z_col_stride, r0, nr, n, gz_buf);
#pragma omp simd
              for (int64_t c = 0; c < nr * n; ++c) {
                gz_sum[c] += gz_f[c];
                gz_eps_sum[c] += gz_f[c] * eps_f[c];
              }
            }
            const float* mu_f = block_rows(mu, p.in.mu_row_stride, r0, nr, n, mu_buf);
            const float* logvar_raw = block_rows(logvar, p.in.logvar_row_stride, r0, nr, n, logvar_buf);
            const float* logvar_f = logvar_raw;
            if (p.in.clamp_logvar) {
              clamp_chunk(logvar_raw, nr * n, p.in.logvar_min, p.in.logvar_max, clamped_buf);
              logvar_f = clamped_buf;
            }
            const float* gkl_f = p.grad_kl == nullptr ? gkl_zeros
                                                      : block_rows_strided(p.grad_kl, p.grad_kl_row_stride,
                                                                           p.grad_kl_col_stride, r0, nr, n, gkl);
            grads(grad_z != nullptr, p.grad_kl != nullptr, mu_f, logvar_f, gkl_f, nr * n, gz_sum, gz_eps_sum);
            if (p.in.clamp_logvar) mask_clamped(logvar_raw, nr * n, p.in.logvar_min, p.in.logvar_max, gz_eps_sum);
          } else {  // long rows, or a prior: row by row
            for (int64_t s = 0; grad_z != nullptr && s < p.samples; ++s) {
              const T* grad_z_sample = grad_z + s * p.grad_z_sample_stride;
              if (p.grad_z_col_stride == 1) prefetch_rows(grad_z_sample, p.grad_z_row_stride, r0, nr, col0, n);
              if (s + 1 == p.samples) {
                prefetch_rows(mu, p.in.mu_row_stride, r0, nr, col0, n);
                prefetch_rows(logvar, p.in.logvar_row_stride, r0, nr, col0, n);
              }
              normals(seed, first_group, static_cast<uint32_t>(s), n_groups, eps);
              for (int64_t i = 0; i < nr; ++i) {
                const float* gz_f = block_rows_strided(grad_z_sample + col0 * p.grad_z_col_stride,
                                                       p.grad_z_row_stride, p.grad_z_col_stride, r0 + i, 1, n, gz_buf);
                const float* eps_row = eps + i * eps_row_stride;
                float* __restrict sum = gz_sum + i * n;
                float* __restrict eps_sum = gz_eps_sum + i * n;
#pragma omp simd
                for (int64_t c = 0; c < n; ++c) {
                  sum[c] += gz_f[c];
                  eps_sum[c] += gz_f[c] * eps_row[c];
                }
              }
            }
            for (int64_t i = 0; i < nr; ++i) {
              const int64_t r = r0 + i;
              const float* mu_f = as_float(mu + r * p.in.mu_row_stride + col0, n, mu_buf);
              const float* logvar_raw = as_float(logvar + r * p.in.logvar_row_stride + col0, n, logvar_buf);
              const float* logvar_f = logvar_raw;
              if (p.in.clamp_logvar) {
                clamp_chunk(logvar_raw, n, p.in.logvar_min, p.in.logvar_max, clamped_buf);
                logvar_f = clamped_buf;
              }
              const float* gkl_f = p.grad_kl == nullptr
                                       ? gkl_zeros
                                       : block_rows_strided(p.grad_kl + col0 * p.grad_kl_col_stride,
                                                            p.grad_kl_row_stride, p.grad_kl_col_stride, r, 1, n, gkl);
              if (with_prior) {
                const float* prior_mu_f = prior_chunk<T>(prior.mu, prior.mu_row_stride, prior.mu_col_stride, r, col0, n,
                                                         prior_mu_buf, gkl_zeros);
                const float* prior_logvar_f = prior_chunk<T>(prior.logvar, prior.logvar_row_stride,
                                                             prior.logvar_col_stride, r, col0, n, prior_logvar_buf,
                                                             gkl_zeros);
                // the prior's gradients go straight to their float32 outputs (row i of the block at i * n,
                // as the sums), or to scratch where they are not wanted
                const int64_t at = r0 * p.in.cols + col0 + i * n;
                float* d_prior_mu = prior_grads.mu != nullptr ? prior_grads.mu + at : d_prior_mu_buf;
                float* d_prior_logvar = prior_grads.logvar != nullptr ? prior_grads.logvar + at : d_prior_logvar_buf;
                chunk_prior_grads(grad_z != nullptr, mu_f, logvar_f, prior_mu_f, prior_logvar_f, gkl_f, n,
                                  gz_sum + i * n, gz_eps_sum + i * n, d_prior_mu, d_prior_logvar);
              } else {
                grads(grad_z != nullptr, p.grad_kl != nullptr, mu_f, logvar_f, gkl_f, n, gz_sum + i * n,
                      gz_eps_sum + i * n);
              }
              if (p.in.clamp_logvar) mask_clamped(logvar_raw, n, p.in.logvar_min, p.in.logvar_max, gz_eps_sum + i * n);
            }
          }
        }
        if (rows_adjacent) {
          store_chunk(gz_sum, nr * n, grad_mu_out);
          store_chunk(gz_eps_sum, nr * n, grad_logvar_out);
        } else {  // the sums sit in the scratch buffers, whatever T (store_chunk skips float32)
          for (int64_t i = 0; i < nr; ++i) {
            copy_chunk(gz_sum + i * n, n, grad_mu_out + i * p.grad_mu_row_stride);
            copy_chunk(gz_eps_sum + i * n, n, grad_logvar_out + i * p.grad_logvar_row_stride);
          }
        }
      }
    }
  });
}

}  // namespace

void reparam_kl_forward(const ReparamKLForwardParams& p, const ReparamKLPrior& prior) {
  with_dtype(p.in.dtype, [&](auto t) { forward_impl<decltype(t)>(p, prior); });
}

void reparam_kl_backward(const ReparamKLBackwardParams& p, const ReparamKLPrior& prior,
                         const ReparamKLPriorGrads& prior_grads) {
  with_dtype(p.in.dtype, [&](auto t) { backward_impl<decltype(t)>(p, prior, prior_grads); });
}

}  // namespace pyvae::cpu
