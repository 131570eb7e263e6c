// Plain-data description of one reparameterize + KL call, filled in by csrc/reparam_kl_ops.cpp and
// read by the CPU and CUDA kernels (which stay torch-free). Inputs are viewed as [rows, cols] with
// unit column stride and the given row strides; z is contiguous, the gradients of mu and logvar
// have unit column stride and row strides of their own (cols, or 2 cols for the packed ops, whose
// one gradient tensor holds both). A prior's mean and log-variance are read in place with row and
// column strides (0 where they broadcast).
#pragma once
#include <stdint.h>

#include "dtype.h"

namespace pyvae {

// What forward and backward both read.
struct ReparamKLInputs {
  DType dtype;
  const void* mu;
  const void* logvar;
  int64_t mu_row_stride, logvar_row_stride;
  int64_t rows, cols;
  // The packed ops' clamp of the log-variance (torch.clamp's: NaN stays NaN; the gradient passes
  // where logvar_min <= logvar <= logvar_max, else 0). Off (false) for reparam_kl_forward/backward.
  bool clamp_logvar;
  float logvar_min, logvar_max;  // -inf / +inf for a side not clamped
};

// The Gaussian prior N(prior_mu, e^prior_logvar) the KL is taken against; `present` false: N(0, I),
// with the kernels' prior-free code. When present, a null mu or logvar reads as 0. Element (r, c)
// of each is at r * row_stride + c * col_stride, in the dtype of mu; col_stride is 0 or 1. Kept
// apart from the call's params (the kernels take it as an argument of its own), so that the
// prior-free kernels are compiled exactly as before.
struct ReparamKLPrior {
  bool present;
  const void* mu;
  const void* logvar;
  int64_t mu_row_stride, mu_col_stride, logvar_row_stride, logvar_col_stride;
  bool vec;  // CUDA: every tensor read along the row (col_stride 1) allows packed loads (set by the launcher)
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
  const void* grad_z;     // [samples, rows, cols] in dtype, or nullptr (no gradient through z): element
                          // (s, r, c) at s * grad_z_sample_stride + r * grad_z_row_stride + c * grad_z_col_stride
  int64_t grad_z_sample_stride, grad_z_row_stride, grad_z_col_stride;  // col stride 0 (expanded) or 1
  const float* grad_kl;   // (r, c) at r * grad_kl_row_stride + c * grad_kl_col_stride, or nullptr
  int64_t grad_kl_row_stride, grad_kl_col_stride;
  void* grad_mu;      // [rows, cols] in dtype, row r at r * grad_mu_row_stride
  void* grad_logvar;  // [rows, cols] in dtype, row r at r * grad_logvar_row_stride
  int64_t grad_mu_row_stride, grad_logvar_row_stride;
};

// Backward's outputs for the prior: float32 [rows, cols] per-element gradients of its mean and
// log-variance (the caller sums them over broadcast dims), or nullptr where not asked for. Written
// only with a grad_kl (without one the prior plays no part and its gradients are zero).
struct ReparamKLPriorGrads {
  float* mu;
  float* logvar;
};

}  // namespace pyvae
