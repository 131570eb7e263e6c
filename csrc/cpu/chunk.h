// Chunked processing shared by the CPU kernels: rows are walked in chunks of kChunk columns held
// in small float buffers, so the element math runs as straight-line loops that g++ vectorises,
// built for AVX-512, AVX2 and the baseline ISA and picked at load time by target_clones (wheels
// stay portable). Row sums go through kLanes fixed lanes, so they do not depend on the ISA.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../common/dtype.h"

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

// 2: AVX-512, 1: AVX2, 0: portable; levels 1 and 2 include F16C. The widest this CPU runs, capped
// by PYVAE_CPU_ISA ("avx512", "avx2" or "portable"), which lets the tests exercise every path on
// one machine. Read once per process.
inline int cpu_isa() {
  static const int isa = [] {
#if defined(__x86_64__)
    const bool f16c = __builtin_cpu_supports("f16c");
    int widest = __builtin_cpu_supports("avx512f") && f16c ? 2 : __builtin_cpu_supports("avx2") && f16c ? 1 : 0;
#else
    int widest = 0;
#endif
    if (const char* cap = getenv("PYVAE_CPU_ISA")) {
      const int asked = strcmp(cap, "portable") == 0 ? 0 : strcmp(cap, "avx2") == 0 ? 1 : 2;
      widest = asked < widest ? asked : widest;
    }
    return widest;
  }();
  return isa;
}

#if defined(__x86_64__)
// float16 <-> float32 with the F16C instructions, 8 at a time. The callers are built for the
// baseline ISA, where c10::Half converts one element at a time in integer code. Round to nearest
// even, as c10::Half does; NaNs stay NaN (payloads may differ).
__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const c10::Half* __restrict src, int64_t n,
                                                                   float* __restrict dst) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c))));
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* __restrict src, int64_t n,
                                                                   c10::Half* __restrict dst) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT));
  for (; c < n; ++c) dst[c] = static_cast<c10::Half>(src[c]);
}
#endif

// A chunk of a row as floats: the row itself for float32, else converted into `buffer`.
template <typename T>
inline const float* as_float(const T* __restrict src, int64_t n, float* __restrict buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, c10::Half>) {
      if (cpu_isa() >= 1) {
        half_to_float_f16c(src, n, buffer);
        return buffer;
      }
    }
#endif
    for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<float>(src[c]);
    return buffer;
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
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, c10::Half>) {
      if (cpu_isa() >= 1) return float_to_half_f16c(src, n, dst);
    }
#endif
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
