// Launcher of the CUDA residual search kernel (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/rvq_params.h"

namespace pyvae::cuda {
void residual_code(const ResidualCodeParams& p, cudaStream_t stream);
}  // namespace pyvae::cuda
