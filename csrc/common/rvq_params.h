// Plain-data description of one residual search, filled in by csrc/rvq_ops.cpp and read by the CPU
// and CUDA kernels (torch-free). The rule of each stage is nearest_code's (common/vq_math.h); the
// stages' arithmetic is float32 whatever the dtypes (kernels/contracts/rvq.py states the op).
#pragma once
#include <stdint.h>

#include "dtype.h"

namespace pyvae {

struct ResidualCodeParams {
  DType x_dtype, codebook_dtype;
  const void* x;          // [rows, dim], unit column stride
  const void* codebooks;  // [stages, codes, dim], contiguous
  int64_t x_row_stride;
  int64_t rows, stages, codes, dim;
  const float* code_sq;   // [stages, codes]: |e|^2 in float32
  int64_t* idx;           // [rows, stages]
  float* dist;            // [rows, stages]: |r_q - e_q[idx_q]|^2, from the new residual's values
  void* quantized;        // [rows, dim] contiguous, x's dtype: the chosen codes summed in stage order
  bool exact;             // false: reduced-precision matrix units where the backend has them
};

}  // namespace pyvae
