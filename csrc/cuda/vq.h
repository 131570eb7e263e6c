// Launcher of the CUDA nearest-code kernel (torch-free).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/vq_params.h"

namespace pyvae::cuda {
void nearest_code(const NearestCodeParams& p, cudaStream_t stream);
void codebook_stats(const CodebookStatsParams& p, cudaStream_t stream);
}  // namespace pyvae::cuda
