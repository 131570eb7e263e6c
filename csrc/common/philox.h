// Philox4x32-10 and the uniform / Box-Muller mapping of Triton's tl.randn4x, shared by the CPU
// and CUDA kernels so every backend draws the same eps for the same seed.
//
// Stream layout used by every pyvae op that needs N(0, 1) noise (see pyvae/ops/reparam_kl.py):
// a tensor viewed as [samples, rows, cols] is split into groups of four consecutive columns of a
// row; group j of row r of sample s uses the Philox counter (lo32(r*G + j), hi32(r*G + j), s, 0)
// with G = ceil(cols / 4) and key (lo32(seed), hi32(seed)); the four outputs of that block become
// the four normals of the group. With one sample and cols % 4 == 0 this is exactly
// tl.randn4x(seed, flat_index // 4).
#pragma once
#include <stdint.h>

#include "hd.h"
#include "vmath.h"

namespace pyvae {

struct Philox4 {
  uint32_t v[4];
};

PYVAE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);  // nvcc emits mul.hi.u32
}

PYVAE_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev0 = c0, prev2 = c2;
    c0 = mulhi32(kRoundB, prev2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, prev0) ^ c3 ^ k1;
    c1 = kRoundB * prev2;
    c3 = kRoundA * prev0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// SplitMix64's finaliser: a bijective 64-bit mix.
PYVAE_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The Philox key of a call whose seed comes from PyTorch's CUDA generator: its (seed, offset)
// state (unique per call, and per replay of a captured graph) mixed into one key in [0, 2^63),
// the range of explicit seeds.
PYVAE_HD int64_t key_from_generator(uint64_t seed, uint64_t offset) {
  return static_cast<int64_t>(mix64(seed ^ mix64(offset)) >> 1);
}

// Triton's uint_to_uniform_float for 32-bit input: a float in [0, 1).
PYVAE_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

struct Normal4 {
  float v[4];
};

// Philox counter and key of group `group` (64-bit) in sample `sample`.
PYVAE_HD Philox4 philox_group(uint64_t seed, uint64_t group, uint32_t sample) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), sample, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Four normals from one Philox block: Box-Muller on each pair of uniforms,
// (r cos(2 pi u2), r sin(2 pi u2)) with r = sqrt(-2 log max(u1, 1e-7)).
PYVAE_HD Normal4 normals_from_bits(const Philox4& b) {
  Normal4 n;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = uint_to_uniform(b.v[2 * pair]);
    const float u2 = uint_to_uniform(b.v[2 * pair + 1]);
    const float r = sqrtf(-2.0f * log_unit(u1 > 1.0e-7f ? u1 : 1.0e-7f));
    float s, c;
    sincos_2pi(u2, s, c);
    n.v[2 * pair] = r * c;
    n.v[2 * pair + 1] = r * s;
  }
  return n;
}

// The four normals of group `group` in sample `sample`.
PYVAE_HD Normal4 normal4(uint64_t seed, uint64_t group, uint32_t sample) {
  return normals_from_bits(philox_group(seed, group, sample));
}

}  // namespace pyvae
