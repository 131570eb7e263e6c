// CUDA kernels of finite scalar quantization: one thread per row of z (its len(levels) values), so
// that the forward sums the row's index in registers, with no second pass and no atomics. The
// per-dimension constants stay in the kernel's parameter space (__grid_constant__: read there,
// indexed by the dimension at run time, never copied to local memory).
#include "../common/fsq_math.h"
#include "common.cuh"
#include "fsq.h"

namespace pyvae::cuda {
namespace {

// The row of z that this thread quantizes (one a thread), or -1 past the last.
__device__ __forceinline__ int64_t thread_row(int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  return row < rows ? row : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fsq_forward_kernel(const __grid_constant__ FsqForwardParams p) {
  const int64_t row = thread_row(p.rows);
  if (row < 0) return;
  const FsqLevels& levels = p.levels;
  const T* z = static_cast<const T*>(p.z) + row * p.z_row_stride;
  T* codes = static_cast<T*>(p.codes) + row * levels.dims;
  uint32_t index = 0;  // wraps (defined) where levels off the grid overflow it, as on the CPU
  bool nan = false;
  for (int64_t j = 0; j < levels.dims; ++j) {
    const FsqDim& d = levels.dim[j];
    const float t = fsq_tanh(to_f32(z[j]) + d.shift).value;
    const float level =
        levels.symmetric ? fsq_symmetric_level(t, d.scale) : fsq_plain_level(t, d.scale, d.offset, d.center);
    codes[j] = from_f32<T>(fsq_code(level, d.center));
    nan = nan || level != level;
    index += static_cast<uint32_t>(fsq_level_int(level)) * d.basis;
  }
  if (p.indices != nullptr) p.indices[row] = nan ? kFsqNanIndex : static_cast<int32_t>(index);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fsq_backward_kernel(const __grid_constant__ FsqBackwardParams p) {
  const int64_t row = thread_row(p.rows);
  if (row < 0) return;
  const T* z = static_cast<const T*>(p.z) + row * p.z_row_stride;
  const T* grad_codes = static_cast<const T*>(p.grad_codes) + row * p.grad_codes_row_stride;
  T* grad_z = static_cast<T*>(p.grad_z) + row * p.levels.dims;
  for (int64_t j = 0; j < p.levels.dims; ++j) {
    const FsqDim& d = p.levels.dim[j];
    grad_z[j] = from_f32<T>(fsq_grad(to_f32(grad_codes[j]), to_f32(z[j]), d.shift, d.grad_scale));
  }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kThreads - 1) / kThreads); }

}  // namespace

void fsq_forward(const FsqForwardParams& p, cudaStream_t stream) {
  const unsigned blocks = blocks_for(p.rows);
  switch (p.dtype) {
    case DType::kFloat32: return fsq_forward_kernel<float><<<blocks, kThreads, 0, stream>>>(p);
    case DType::kFloat16: return fsq_forward_kernel<__half><<<blocks, kThreads, 0, stream>>>(p);
    case DType::kBFloat16: return fsq_forward_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(p);
  }
}

void fsq_backward(const FsqBackwardParams& p, cudaStream_t stream) {
  const unsigned blocks = blocks_for(p.rows);
  switch (p.dtype) {
    case DType::kFloat32: return fsq_backward_kernel<float><<<blocks, kThreads, 0, stream>>>(p);
    case DType::kFloat16: return fsq_backward_kernel<__half><<<blocks, kThreads, 0, stream>>>(p);
    case DType::kBFloat16: return fsq_backward_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(p);
  }
}

}  // namespace pyvae::cuda
