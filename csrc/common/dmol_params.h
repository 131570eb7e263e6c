// Plain-data description of one discretized-mixture-of-logistics call, filled in by
// csrc/dmol_ops.cpp and read by the CPU and CUDA kernels. Parameters [B, N, P] and data [B, N, C]
// (N positions) are addressed through strides, so one kernel reads both layouts: channels-last
// (P contiguous per position) and channels-first (positions contiguous per parameter).
#pragma once
#include <stdint.h>

#include "dmol_math.h"
#include "dtype.h"

namespace pyvae {

struct DmolParams {
  DType params_dtype, x_dtype;
  const void* params;
  const void* x;  // on the grid k / (num_classes - 1) * 2 - 1
  int64_t batch, positions, num_params, channels, num_mix, num_classes;
  int64_t params_batch_stride, params_position_stride, params_param_stride;
  int64_t x_batch_stride, x_position_stride, x_channel_stride;
  // [batch, positions] per position, or [batch, position_blocks] partial sums (the caller adds
  // each sample's blocks in order)
  float* nll;
  bool per_position;
  // the gradient of grad_scale * (sum of the NLLs) to params, in params' dtype and layout (the
  // same strides), or nullptr
  void* grad;
  float grad_scale;
};

// One call of the sampler: params as above; the sample x (float32) in params' layout with C
// channels where params has its P parameters; the Philox key read from `seed` (one int64 on the
// device: the kernels read it there, so no host synchronisation).
struct DmolSampleParams {
  DType params_dtype;
  const void* params;
  const int64_t* seed;
  int64_t batch, positions, channels, num_mix;
  int64_t params_batch_stride, params_position_stride, params_param_stride;
  int64_t x_batch_stride, x_position_stride, x_channel_stride;
  float temperature;
  float* x;
};

// Positions per partial sum of a sample's NLL: the partial sums are added in order, so the result
// does not depend on how the work is split.
constexpr int64_t kDmolPositionBlock = 4096;

PYVAE_HD int64_t dmol_position_blocks(int64_t positions) {
  return (positions + kDmolPositionBlock - 1) / kDmolPositionBlock;
}

}  // namespace pyvae
