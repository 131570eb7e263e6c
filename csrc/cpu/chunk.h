// Chunked processing shared by the CPU kernels: rows are walked in chunks of kChunk columns held
// in small float buffers, so the element math runs as straight-line loops that g++ vectorises,
// built for AVX-512, AVX2 and the baseline ISA and picked at load time by target_clones (wheels
// stay portable). Row sums go through kLanes fixed lanes, so they do not depend on the ISA.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <type_traits>

#include "../common/reparam_kl_params.h"  // DType

namespace pyvae::cpu {

constexpr int64_t kChunk = 256;  // columns per chunk (a multiple of kLanes)
constexpr int kLanes = 8;        // partial sums per row

#if defined(__x86_64__) && !defined(__clang__)
#define PYVAE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYVAE_MULTIVERSION
#endif

// Calls f(T{}) with the C++ type of a kernel dtype.
template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

// A chunk of a row as floats, copied (and converted) into `buffer`.
template <typename T>
inline const float* to_float_buffer(const T* __restrict src, int64_t n, float* __restrict buffer) {
  for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<float>(src[c]);
  return buffer;
}

// A chunk of a row as floats: the row itself for float32, else converted into `buffer`.
template <typename T>
inline const float* as_float(const T* __restrict src, int64_t n, float* __restrict buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    return to_float_buffer(src, n, buffer);
  }
}

// Where to compute a chunk of an output row: the row itself for float32, else `buffer`
// (then written back by store_chunk).
template <typename T>
inline float* float_target(T* dst, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename T>
inline void store_chunk(const float* __restrict src, int64_t n, T* __restrict dst) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c]);
  }
}

// Asks the memory system for [p, p + bytes) ahead of use, one request per cache line.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(c + offset);
}

// sum[c] += values[c] for c in [0, n).
inline void add_chunk(const float* __restrict values, int64_t n, float* __restrict sum) {
  for (int64_t c = 0; c < n; ++c) sum[c] += values[c];
}

// Adds values[0, n) into the lanes, element c of the chunk going to lane c % kLanes (chunks start
// at multiples of kLanes, so this is also the column's lane).
inline void accumulate_lanes(const float* __restrict values, int64_t n, float* __restrict lanes) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += values[c + l];
  for (int l = 0; c + l < n; ++l) lanes[l] += values[c + l];
}

inline float sum_lanes(const float* lanes) {
  // Fixed pairwise order.
  return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

}  // namespace pyvae::cpu
