#pragma once
#include <ATen/ATen.h>

namespace pyvae::cpu {
// idx[n] = argmin_k |x[n] - codebook[k]|^2 (ties to the lowest k; codes whose distance is NaN are
// never chosen; a row with no finite distance gets 0), dist[n] = that squared distance (float32).
void nearest_code(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& idx, at::Tensor& dist);
// counts[k] = #{n : idx[n] = k}, sums[k] = sum of x[n] over those n (float32, fixed order).
void codebook_stats(const at::Tensor& x, const at::Tensor& idx, at::Tensor& counts, at::Tensor& sums);
}  // namespace pyvae::cpu
