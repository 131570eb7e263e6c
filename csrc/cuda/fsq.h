// Launchers of the CUDA finite-scalar-quantization kernels (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/fsq_params.h"

namespace pyvae::cuda {
void fsq_forward(const FsqForwardParams& p, cudaStream_t stream);
void fsq_backward(const FsqBackwardParams& p, cudaStream_t stream);
}  // namespace pyvae::cuda
