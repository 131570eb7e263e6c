// Launcher of the CUDA likelihood kernel (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/likelihood_params.h"

namespace pyvae::cuda {
void likelihood(const LikelihoodParams& p, cudaStream_t stream);
// grad[0, n) *= *scale (scale: one float32 on the device), read by the kernel itself: nothing
// happens when it is 1, with no host synchronisation to find that out.
void scale_unless_one(void* grad, DType dtype, int64_t n, const float* scale, cudaStream_t stream);
}  // namespace pyvae::cuda
