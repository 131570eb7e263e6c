// Plain-data description of one reparameterize + KL call, filled in by csrc/ops.cpp and read by the
// CPU and CUDA kernels (which stay torch-free). Inputs are viewed as [rows, cols] with unit column
// stride and the given row strides; z and the gradients are contiguous.
#pragma once
#include <stdint.h>

namespace pyvae {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What forward and backward both read.
struct ReparamKLInputs {
  DType dtype;
  const void* mu;
  const void* logvar;
  int64_t mu_row_stride, logvar_row_stride;
  int64_t rows, cols;
  const int64_t* seed;  // one int64 in the same memory space as the tensors
};

struct ReparamKLForwardParams {
  ReparamKLInputs in;
  int64_t samples;
  void* z;    // [samples, rows, cols] in dtype
  float* kl;  // [rows, cols] if kl_per_element else [rows]
  bool kl_per_element;
};

struct ReparamKLBackwardParams {
  ReparamKLInputs in;
  int64_t samples;        // of grad_z
  const void* grad_z;     // [samples, rows, cols] in dtype, or nullptr (no gradient through z)
  const float* grad_kl;   // (r, c) at r * grad_kl_row_stride + c * grad_kl_col_stride, or nullptr
  int64_t grad_kl_row_stride, grad_kl_col_stride;
  void* grad_mu;      // [rows, cols] in dtype
  void* grad_logvar;  // [rows, cols] in dtype
};

}  // namespace pyvae
