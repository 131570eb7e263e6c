// Launcher of the CUDA discretized-mixture-of-logistics kernel (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/dmol_params.h"

namespace pyvae::cuda {
void dmol(const DmolParams& p, cudaStream_t stream);
void dmol_sample(const DmolSampleParams& p, cudaStream_t stream);
}  // namespace pyvae::cuda
