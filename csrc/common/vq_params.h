// Plain-data description of one nearest-code search, filled in by csrc/ops.cpp and read by the
// CUDA kernel (torch-free). x is [rows, dim] and the codebook [codes, dim], each with unit column
// stride; code_sq[k] = |e_k|^2 in float32.
#pragma once
#include <stdint.h>

#include "reparam_kl_params.h"  // DType

namespace pyvae {

struct NearestCodeParams {
  DType x_dtype, codebook_dtype;
  const void* x;
  const void* codebook;
  int64_t x_row_stride, codebook_row_stride;
  int64_t rows, codes, dim;
  const float* code_sq;
  int64_t* idx;  // [rows]
  float* dist;   // [rows]: |x|^2 + min over k of (|e_k|^2 - 2 x.e_k), clamped at 0
};

}  // namespace pyvae
