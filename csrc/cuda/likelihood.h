// Launchers of the CUDA likelihood kernels (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/likelihood_params.h"

namespace pyvae::cuda {
void likelihood_forward(const LikelihoodForwardParams& p, cudaStream_t stream);
void likelihood_backward(const LikelihoodBackwardParams& p, cudaStream_t stream);
}  // namespace pyvae::cuda
