// Philox4x32-10 (csrc/common/philox.h) for a run of consecutive groups, with x86 SIMD intrinsics
// where the CPU has them: g++ auto-vectorises the 32x32->64-bit products of the scalar code into
// vpmullq or multi-instruction emulations, while _mm*_mul_epu32 is exactly the widening product
// Philox needs, one instruction for 4 (AVX2) or 8 (AVX-512) lanes.
#pragma once
#include <stdint.h>

#include "../common/philox.h"
#include "chunk.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace pyvae::cpu {

// words[k][j] = word k of Philox(counter = (lo32(group0 + j), hi32(group0 + j), sample, 0), key = seed).
struct PhiloxWords {
  uint32_t* w[4];
};

inline void philox_words_portable(uint64_t seed, uint64_t group0, uint32_t sample, int64_t begin, int64_t n,
                                  PhiloxWords out) {
  for (int64_t j = begin; j < n; ++j) {
    const Philox4 b = philox_group(seed, group0 + static_cast<uint64_t>(j), sample);
    for (int k = 0; k < 4; ++k) out.w[k][j] = b.v[k];
  }
}

#if defined(__x86_64__)
// 64-bit lanes holding 32-bit Philox words in their low halves; the high halves carry garbage that
// never reaches a low half (mul_epu32 reads only low halves, xor is bitwise, outputs are truncated).
__attribute__((target("avx512f"))) inline void philox_words_avx512(uint64_t seed, uint64_t group0, uint32_t sample,
                                                                   int64_t n, PhiloxWords out) {
  const __m512i round_a = _mm512_set1_epi64(0xD2511F53u), round_b = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m512i counter = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(group0 + j)), lane);
    __m512i x0 = counter, x1 = _mm512_srli_epi64(counter, 32);
    __m512i x2 = _mm512_set1_epi64(sample), x3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i prod_b = _mm512_mul_epu32(x2, round_b);
      const __m512i prod_a = _mm512_mul_epu32(x0, round_a);
      // 0x96: three-way xor
      x0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(prod_b, 32), x1, _mm512_set1_epi64(k0), 0x96);
      x2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(prod_a, 32), x3, _mm512_set1_epi64(k1), 0x96);
      x1 = prod_b;
      x3 = prod_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.w[0] + j), _mm512_cvtepi64_epi32(x0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.w[1] + j), _mm512_cvtepi64_epi32(x1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.w[2] + j), _mm512_cvtepi64_epi32(x2));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.w[3] + j), _mm512_cvtepi64_epi32(x3));
  }
  philox_words_portable(seed, group0, sample, j, n, out);
}

__attribute__((target("avx2"))) inline void philox_words_avx2(uint64_t seed, uint64_t group0, uint32_t sample,
                                                              int64_t n, PhiloxWords out) {
  const __m256i round_a = _mm256_set1_epi64x(0xD2511F53u), round_b = _mm256_set1_epi64x(0xCD9E8D57u);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  // Gathers the low halves of four 64-bit lanes into four consecutive 32-bit words.
  const __m256i low_halves = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256i counter = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(group0 + j)), lane);
    __m256i x0 = counter, x1 = _mm256_srli_epi64(counter, 32);
    __m256i x2 = _mm256_set1_epi64x(sample), x3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i prod_b = _mm256_mul_epu32(x2, round_b);
      const __m256i prod_a = _mm256_mul_epu32(x0, round_a);
      x0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_b, 32), x1), _mm256_set1_epi64x(k0));
      x2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), x3), _mm256_set1_epi64x(k1));
      x1 = prod_b;
      x3 = prod_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256i* words[4] = {&x0, &x1, &x2, &x3};
    for (int k = 0; k < 4; ++k) {
      const __m256i packed = _mm256_permutevar8x32_epi32(*words[k], low_halves);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out.w[k] + j), _mm256_castsi256_si128(packed));
    }
  }
  philox_words_portable(seed, group0, sample, j, n, out);
}
#endif

// Philox words of groups [group0, group0 + n) with the implementation picked once per process.
inline void philox_words(uint64_t seed, uint64_t group0, uint32_t sample, int64_t n, PhiloxWords out) {
#if defined(__x86_64__)
  const int isa = cpu_isa();
  if (isa == 2) return philox_words_avx512(seed, group0, sample, n, out);
  if (isa == 1) return philox_words_avx2(seed, group0, sample, n, out);
#endif
  philox_words_portable(seed, group0, sample, 0, n, out);
}

}  // namespace pyvae::cpu
