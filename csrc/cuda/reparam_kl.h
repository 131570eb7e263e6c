// Launchers of the CUDA reparameterize + KL kernels. Torch-free: raw pointers in the params
// struct and the stream to launch on.
#pragma once
#include <cuda_runtime_api.h>

#include "../common/reparam_kl_params.h"

namespace pyvae::cuda {
void reparam_kl_forward(const ReparamKLForwardParams& p, const ReparamKLPrior& prior, cudaStream_t stream);
void reparam_kl_backward(const ReparamKLBackwardParams& p, const ReparamKLPrior& prior,
                         const ReparamKLPriorGrads& prior_grads, cudaStream_t stream);
}  // namespace pyvae::cuda
