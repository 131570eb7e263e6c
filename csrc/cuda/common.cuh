// Device helpers shared by the CUDA kernels: float conversion of the kernel dtypes, single and packed loads
// and stores of four consecutive elements, and the deterministic per-row sum over the threads
// that cover a row.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "../common/dtype.h"

namespace pyvae::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One element of a tensor whose dtype is known only at run time (uniform across the grid, so the
// switch costs no divergence).
__device__ __forceinline__ float load_any(DType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  return 0.0f;
}

__device__ __forceinline__ void store_any(DType dtype, void* base, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[i] = v; return;
    case DType::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); return;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); return;
  }
}

// Four elements as one 16-byte (fp32) or 8-byte (16-bit types) access.
template <typename T> struct Pack4 {
  using type = typename std::conditional<sizeof(T) == 4, float4, uint2>::type;
};

// Loads elements [col, col + 4) of a row (zeros past `cols`); `vec` says the row is aligned for
// one packed access and cols % 4 == 0.
template <typename T>
__device__ __forceinline__ void load4(const T* row, int64_t col, int64_t cols, bool vec, float out[4]) {
  if (vec) {
    const typename Pack4<T>::type packed = *reinterpret_cast<const typename Pack4<T>::type*>(row + col);
    T parts[4];
    memcpy(parts, &packed, sizeof parts);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = to_f32(parts[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = col + k < cols ? to_f32(row[col + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* row, int64_t col, int64_t cols, bool vec, const float in[4]) {
  if (vec) {
    T parts[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) parts[k] = from_f32<T>(in[k]);
    typename Pack4<T>::type packed;
    memcpy(&packed, parts, sizeof parts);
    *reinterpret_cast<typename Pack4<T>::type*>(row + col) = packed;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (col + k < cols) row[col + k] = from_f32<T>(in[k]);
  }
}

// Sum of `value` over the threads_per_row threads of each row, returned to the row's first
// thread. threads_per_row is a power of two <= kThreads; every thread of the block must call.
__device__ float row_sum(float value, int threads_per_row) {
  __shared__ float warp_sums[kThreads / 32];
  const int width = threads_per_row < 32 ? threads_per_row : 32;
  for (int offset = width / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threads_per_row <= 32) return value;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps_per_row = threads_per_row / 32;
  const int first_warp = (threadIdx.x / threads_per_row) * warps_per_row;
  float total = 0.0f;
  for (int w = 0; w < warps_per_row; ++w) total += warp_sums[first_warp + w];
  return total;
}

struct RowLayout {
  int threads_per_row;
  int rows_per_block;
};

RowLayout row_layout(int64_t cols) {
  const int64_t groups = (cols + 3) / 4;
  int tpr = 1;
  while (tpr < groups && tpr < kThreads) tpr *= 2;
  return RowLayout{tpr, kThreads / tpr};
}


// Four elements of a tensor whose dtype is known only at run time (uniform across the grid, so
// the switch costs no divergence).
__device__ __forceinline__ void load4_dtype(DType dtype, const void* row, int64_t col, int64_t cols, bool vec,
                                            float out[4]) {
  switch (dtype) {
    case DType::kFloat32: return load4(static_cast<const float*>(row), col, cols, vec, out);
    case DType::kFloat16: return load4(static_cast<const __half*>(row), col, cols, vec, out);
    case DType::kBFloat16: return load4(static_cast<const __nv_bfloat16*>(row), col, cols, vec, out);
  }
}

__device__ __forceinline__ void store4_dtype(DType dtype, void* row, int64_t col, int64_t cols, bool vec,
                                             const float in[4]) {
  switch (dtype) {
    case DType::kFloat32: return store4(static_cast<float*>(row), col, cols, vec, in);
    case DType::kFloat16: return store4(static_cast<__half*>(row), col, cols, vec, in);
    case DType::kBFloat16: return store4(static_cast<__nv_bfloat16*>(row), col, cols, vec, in);
  }
}

__host__ __device__ inline size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// True when every group of four columns of every row can be read as one packed access.
inline bool packable_bytes(const void* base, int64_t row_stride, int64_t cols, size_t elem) {
  return cols % 4 == 0 && row_stride % 4 == 0 && reinterpret_cast<uintptr_t>(base) % (4 * elem) == 0;
}

template <typename T>
bool packable(const void* base, int64_t row_stride, int64_t cols) {
  return packable_bytes(base, row_stride, cols, sizeof(T));
}

}  // namespace
}  // namespace pyvae::cuda
