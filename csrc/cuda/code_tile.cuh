// The tile scheme of the CUDA code searches (vq.cu nearest_code, rvq.cu residual_code): a block of
// 256 threads takes 64 rows against 64 codes at a time, 32 dimensions per shared-memory slice, with
// float32 products on CUDA cores. Thread t owns rows ty + 16 i and codes tx + 16 j (i, j < 4) of a
// tile and keeps, for its 4 rows, the running (min, argmin) over the codes it has seen; the 16
// threads that share rows merge their candidates at the end.
#pragma once
#include <math.h>
#include <stdint.h>

#include "../common/vq_math.h"
#include "common.cuh"

namespace pyvae::cuda {
namespace {

constexpr int kTileRows = 64, kTileCodes = 64, kTileDim = 32;

// (value, index) order: smaller value first, then smaller index.
__device__ __forceinline__ bool before(float v, int64_t i, float best_v, int64_t best_i) {
  return v < best_v || (v == best_v && i < best_i);
}

struct TileLane {
  int tx, ty;
};

__device__ __forceinline__ TileLane tile_lane() { return {static_cast<int>(threadIdx.x % 16), static_cast<int>(threadIdx.x / 16)}; }

struct RunningBest {
  float best[4], x_sq[4];
  int64_t idx[4];
};

__device__ __forceinline__ void init_best(RunningBest& b) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b.best[i] = INFINITY;
    b.idx[i] = 0;
    b.x_sq[i] = 0.0f;
  }
}

// Folds the dot products dot(i, j) of the code tile at code0 (of `codes`, with |e|^2 in code_sq)
// into the thread's running (min, argmin) per row. Codes come in increasing order: a strict <
// keeps the lowest on ties; a distance that is not finite never wins (beats_best).
template <typename Dot>
__device__ __forceinline__ void fold_tile(const float* code_sq, int64_t codes, int64_t code0, TileLane lane, Dot dot,
                                          RunningBest& b) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t code = code0 + lane.tx + 16 * j;
    if (code >= codes) continue;
    const float sq = code_sq[code];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float d = sq - 2.0f * dot(i, j);
      if (beats_best(d, b.best[i])) {
        b.best[i] = d;
        b.idx[i] = code;
      }
    }
  }
}

// Merges the 16 candidates of a row (lanes ty*16 .. ty*16+15 of one warp half) with a shuffle tree
// that prefers the lower index on ties: each of the 16 lanes ends with the row's (min, argmin).
// Every thread of the warp must call.
__device__ __forceinline__ void merge_row(float& v, int64_t& k) {
  for (int offset = 8; offset > 0; offset /= 2) {
    const float other_v = __shfl_xor_sync(0xffffffffu, v, offset, 16);
    const int64_t other_k = __shfl_xor_sync(0xffffffffu, k, offset, 16);
    if (before(other_v, other_k, v, k)) {
      v = other_v;
      k = other_k;
    }
  }
}

// acc[i][j] += the products over one 32-dimension slice of row ty + 16 i of xs (rows x_ld floats
// apart) and code tx + 16 j of es.
__device__ __forceinline__ void accumulate_slice(const float* xs, int64_t x_ld, const float (*es)[kTileDim + 1],
                                                 TileLane lane, float acc[4][4]) {
#pragma unroll 8
  for (int c = 0; c < kTileDim; ++c) {
    float xv[4], ev[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) xv[i] = xs[(lane.ty + 16 * i) * x_ld + c];
#pragma unroll
    for (int j = 0; j < 4; ++j) ev[j] = es[lane.tx + 16 * j][c];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], ev[j], acc[i][j]);
  }
}

}  // namespace
}  // namespace pyvae::cuda
