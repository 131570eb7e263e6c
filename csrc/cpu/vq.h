#pragma once
#include <ATen/ATen.h>

namespace pyvae::cpu {
// idx[n] = argmin_k |x[n] - codebook[k]|^2 (ties to the lowest k; codes whose distance is NaN are
// never chosen; a row with no finite distance gets 0), dist[n] = that squared distance (float32).
void nearest_code(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& idx, at::Tensor& dist);
// The nearest of the codes e [K, D] to each row of xb [nr, D] (both float32, contiguous), by
// nearest_code's rule: best_code[i] and its expanded distance best[i] = |e|^2 - 2 x.e (without
// |x|^2; inf for a row with no finite distance). e_sq[k] = |e_k|^2. BLAS GEMMs of at most kCodes
// codes at a time, the argmin folded in straight away, each block of scores in scores_buffer (from
// new_scores_buffer, for at least xb's rows and e's codes).
void search_rows(const at::Tensor& xb, const at::Tensor& e, const float* e_sq, float* best, int64_t* best_code,
                 at::Tensor& scores_buffer);
at::Tensor new_scores_buffer(int64_t rows, int64_t codes, const at::TensorOptions& options);
// counts[k] = #{n : idx[n] = k}, sums[k] = sum of x[n] over those n (float32, fixed order).
void codebook_stats(const at::Tensor& x, const at::Tensor& idx, at::Tensor& counts, at::Tensor& sums);
}  // namespace pyvae::cpu
