// CPU vector quantisation: the distance matrix is formed block by block with BLAS GEMM
// (|x|^2 - 2 x.e + |e|^2, in float32 whatever the input dtype) and reduced to a running
// (min, argmin) per row straight away, so memory stays at one kRows x kCodes block, never N x K.
#include "vq.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/vq_math.h"
#include "chunk.h"  // PYVAE_MULTIVERSION

namespace pyvae::cpu {
namespace {
constexpr int64_t kRows = 1024;   // rows of x per block
constexpr int64_t kCodes = 2048;  // codes per block: a block of scores is 8 MiB
constexpr int kLanes = 16;

// Folds one row of scores (distance = |e|^2 - 2 x.e for codes code0 .. code0 + n) into the row's
// running (best, best_code). kLanes independent running minima let g++ vectorise the scan; a
// strict < keeps the lowest code within a lane, the lane merge prefers the lower code on ties,
// and a distance that is not finite never wins (beats_best).
PYVAE_MULTIVERSION void update_best(const float* __restrict scores, const float* __restrict code_sq, int64_t n,
                                    int64_t code0, float& best, int64_t& best_code) {
  float lane_best[kLanes];
  int32_t lane_code[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lane_best[l] = std::numeric_limits<float>::infinity();
    lane_code[l] = 0;
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float d = code_sq[j + l] - 2.0f * scores[j + l];
      const bool better = beats_best(d, lane_best[l]);
      lane_best[l] = better ? d : lane_best[l];
      lane_code[l] = better ? static_cast<int32_t>(j + l) : lane_code[l];
    }
  }
  for (; j < n; ++j) {  // the tail, into the lanes it would have had
    const float d = code_sq[j] - 2.0f * scores[j];
    const int l = static_cast<int>(j % kLanes);
    if (beats_best(d, lane_best[l])) {
      lane_best[l] = d;
      lane_code[l] = static_cast<int32_t>(j);
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    const int64_t code = code0 + lane_code[l];
    if (lane_best[l] < best || (lane_best[l] == best && code < best_code)) {
      best = lane_best[l];
      best_code = code;
    }
  }
}
}  // namespace

at::Tensor new_scores_buffer(int64_t rows, int64_t codes, const at::TensorOptions& options) {
  return at::empty({rows * std::min(kCodes, codes)}, options.dtype(at::kFloat));
}

void search_rows(const at::Tensor& xb, const at::Tensor& e, const float* e_sq, float* best, int64_t* best_code,
                 at::Tensor& scores_buffer) {
  const int64_t nr = xb.size(0), k = e.size(0);
  std::fill(best, best + nr, std::numeric_limits<float>::infinity());
  std::fill(best_code, best_code + nr, int64_t{0});
  for (int64_t c0 = 0; c0 < k; c0 += kCodes) {
    const int64_t nc = std::min(kCodes, k - c0);
    // into one buffer for the whole call: a fresh block of scores (megabytes) would be mapped and
    // page-faulted anew by every GEMM
    at::Tensor scores = scores_buffer.narrow(0, 0, nr * nc).view({nr, nc});
    at::mm_out(scores, xb, e.narrow(0, c0, nc).t());  // BLAS, multi-threaded
    const float* s = scores.data_ptr<float>();
    at::parallel_for(0, nr, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) update_best(s + i * nc, e_sq + c0, nc, c0, best[i], best_code[i]);
    });
  }
}

void nearest_code(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& idx, at::Tensor& dist) {
  const int64_t n = x.size(0);
  const at::Tensor e = codebook.to(at::kFloat).contiguous();
  const at::Tensor e_sq = e.mul(e).sum(1);
  int64_t* idx_p = idx.data_ptr<int64_t>();
  float* dist_p = dist.data_ptr<float>();
  std::vector<float> best(std::min(kRows, n));
  at::Tensor scores = new_scores_buffer(std::min(kRows, n), e.size(0), e.options());
  for (int64_t r0 = 0; r0 < n; r0 += kRows) {
    const int64_t nr = std::min(kRows, n - r0);
    const at::Tensor xb = x.narrow(0, r0, nr).to(at::kFloat).contiguous();
    const at::Tensor x_sq = xb.mul(xb).sum(1);
    search_rows(xb, e, e_sq.data_ptr<float>(), best.data(), idx_p + r0, scores);
    const float* x_sq_p = x_sq.data_ptr<float>();
    for (int64_t i = 0; i < nr; ++i) {
      // A rounded expansion can dip below 0 for a code equal to x: clamp. A row with no finite
      // distance (NaN in x) keeps code 0 and gets a NaN (or inf) distance.
      const float d = best[i] + x_sq_p[i];
      dist_p[r0 + i] = d < 0.0f ? 0.0f : d;
    }
  }
}

void codebook_stats(const at::Tensor& x, const at::Tensor& idx, at::Tensor& counts, at::Tensor& sums) {
  const int64_t n = x.size(0), d = x.size(1), k = counts.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* cp = counts.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  std::fill(sp, sp + k * d, 0.0f);
  // counted in int64 (a float32 count stops at 2^24), then rounded once, as the GPU kernels do
  std::vector<int64_t> code_counts(k, 0);
  for (int64_t i = 0; i < n; ++i) ++code_counts[ip[i]];
  for (int64_t c = 0; c < k; ++c) cp[c] = static_cast<float>(code_counts[c]);
  // Each thread owns a slice of the columns and adds rows in order: deterministic for any thread count.
  at::parallel_for(0, d, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t i = 0; i < n; ++i) {
      float* dst = sp + ip[i] * d;
      const float* src = xp + i * d;
      for (int64_t c = c_begin; c < c_end; ++c) dst[c] += src[c];
    }
  });
}

}  // namespace pyvae::cpu
