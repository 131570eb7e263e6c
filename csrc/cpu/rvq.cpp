// CPU residual vector quantisation: a block of rows goes through all the stages while its float32
// residual and running sum of codes stay in cache; each stage is nearest_code's blocked GEMM search
// (search_rows, cpu/vq.cpp), then one pass over the block subtracts the chosen codes. Memory beyond
// the outputs: one block of residuals, of sums and of scores; never N x K, nor a residual per stage.
#include "rvq.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "chunk.h"  // PYVAE_MULTIVERSION
#include "vq.h"

namespace pyvae::cpu {
namespace {
// rows per block: with D = 128, 1 MiB of residuals and as much of sums; larger blocks than
// nearest_code's 1024 make each stage's GEMM a little more efficient (measured: bench/results/cpu/rvq.md)
constexpr int64_t kRows = 2048;

// r -= code and sum += code over one row; returns |r|^2 of the new residual (the stage's distance).
PYVAE_MULTIVERSION float subtract_code(float* __restrict r, float* __restrict sum, const float* __restrict code,
                                       int64_t dim) {
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < dim; ++d) {
    const float v = r[d] - code[d];
    r[d] = v;
    sum[d] += code[d];
    sq += v * v;
  }
  return sq;
}
}  // namespace

void residual_code(const at::Tensor& x, const at::Tensor& codebooks, at::Tensor& idx, at::Tensor& dist,
                   at::Tensor& quantized) {
  const int64_t n = x.size(0), stages = codebooks.size(0), dim = codebooks.size(2);
  const at::Tensor e = codebooks.to(at::kFloat).contiguous();
  const at::Tensor e_sq = e.mul(e).sum(2);  // [Q, K]
  const float* e_p = e.data_ptr<float>();
  const int64_t stage_stride = e.stride(0), codes = e.size(1);
  int64_t* idx_p = idx.data_ptr<int64_t>();
  float* dist_p = dist.data_ptr<float>();
  const int64_t block_rows = std::min(kRows, n);
  at::Tensor residual = at::empty({block_rows, dim}, x.options().dtype(at::kFloat));
  at::Tensor sums = at::empty({block_rows, dim}, x.options().dtype(at::kFloat));
  std::vector<float> best(block_rows);
  std::vector<int64_t> code(block_rows);
  at::Tensor scores = new_scores_buffer(block_rows, codes, e.options());
  for (int64_t r0 = 0; r0 < n; r0 += kRows) {
    const int64_t nr = std::min(kRows, n - r0);
    at::Tensor rb = residual.narrow(0, 0, nr), sb = sums.narrow(0, 0, nr);
    rb.copy_(x.narrow(0, r0, nr));
    sb.zero_();
    float* r_p = rb.data_ptr<float>();
    float* s_p = sb.data_ptr<float>();
    for (int64_t q = 0; q < stages; ++q) {
      search_rows(rb, e[q], e_sq.data_ptr<float>() + q * codes, best.data(), code.data(), scores);
      const float* stage = e_p + q * stage_stride;
      at::parallel_for(0, nr, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t row = r0 + i;
          idx_p[row * stages + q] = code[i];
          dist_p[row * stages + q] = subtract_code(r_p + i * dim, s_p + i * dim, stage + code[i] * dim, dim);
        }
      });
    }
    quantized.narrow(0, r0, nr).copy_(sb);
  }
}

}  // namespace pyvae::cpu
