// Launcher of the CUDA likelihood kernel (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/likelihood_params.h"

namespace pyvae::cuda {
void likelihood(const LikelihoodParams& p, cudaStream_t stream);
}  // namespace pyvae::cuda
