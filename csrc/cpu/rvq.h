#pragma once
#include <ATen/ATen.h>

namespace pyvae::cpu {
// Residual search of the rows of x [N, D] (unit column stride) through codebooks [Q, K, D]
// (kernels/contracts/rvq.py states it): idx [N, Q] (int64), dist [N, Q] (float32) and
// quantized [N, D] (x's dtype, contiguous), all written here.
void residual_code(const at::Tensor& x, const at::Tensor& codebooks, at::Tensor& idx, at::Tensor& dist,
                   at::Tensor& quantized);
}  // namespace pyvae::cpu
