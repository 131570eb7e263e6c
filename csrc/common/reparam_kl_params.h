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
};

// Where the forward kernel gets its Philox key, and where it records it for backward.
struct SeedSource {
  // A known key (an explicit seed, or one the host drew from the CPU generator) ...
  int64_t key;
  // ... or PyTorch's CUDA generator state (at::PhiloxCudaState, copied field by field so this
  // header stays torch-free): values, or device pointers plus an offset while a graph is captured.
  bool from_cuda_generator;
  bool captured;
  uint64_t generator_seed, generator_offset, offset_intragraph;
  const int64_t* generator_seed_ptr;
  const int64_t* generator_offset_ptr;
  int64_t* key_out;  // 0-d int64 in the tensors' memory space: the key used (saved for backward)
};

struct ReparamKLForwardParams {
  ReparamKLInputs in;
  SeedSource seed;
  int64_t samples;
  void* z;    // [samples, rows, cols] in dtype
  float* kl;  // [rows, cols] if kl_per_element else [rows]
  bool kl_per_element;
};

struct ReparamKLBackwardParams {
  ReparamKLInputs in;
  const int64_t* seed;    // the key forward recorded (same memory space as the tensors)
  int64_t samples;        // of grad_z
  const void* grad_z;     // [samples, rows, cols] in dtype, or nullptr (no gradient through z)
  const float* grad_kl;   // (r, c) at r * grad_kl_row_stride + c * grad_kl_col_stride, or nullptr
  int64_t grad_kl_row_stride, grad_kl_col_stride;
  void* grad_mu;      // [rows, cols] in dtype
  void* grad_logvar;  // [rows, cols] in dtype
};

}  // namespace pyvae
