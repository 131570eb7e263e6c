// CUDA nearest-code search in float32: a block takes 64 rows of x and walks the codebook 64 codes
// at a time, staging 32-dimension slices of both in shared memory; each thread accumulates a 4 x 4
// tile of dot products and keeps, for its 4 rows, the running (min, argmin) over the codes it has
// seen. The 16 threads that share rows then merge their candidates with a shuffle tree that prefers
// the lower index on ties. |x|^2 (which does not change the argmin) comes from the x slices of the
// first code tile and is added at the end. Memory beyond the outputs: none (no N x K matrix).
#include <math.h>

#include <algorithm>

#include "common.cuh"
#include "vq.h"

namespace pyvae::cuda {
namespace {

constexpr int kTileRows = 64, kTileCodes = 64, kTileDim = 32;

__device__ __forceinline__ float load_any(DType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  return 0.0f;
}

// (value, index) order: smaller value first, then smaller index.
__device__ __forceinline__ bool before(float v, int64_t i, float best_v, int64_t best_i) {
  return v < best_v || (v == best_v && i < best_i);
}

__global__ void __launch_bounds__(256) nearest_code_kernel(NearestCodeParams p) {
  __shared__ float xs[kTileRows][kTileDim + 1];
  __shared__ float es[kTileCodes][kTileDim + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // codes tx + 16 j, rows ty + 16 i
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  float best[4], x_sq[4];
  int64_t best_idx[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = INFINITY;
    best_idx[i] = 0;
    x_sq[i] = 0.0f;
  }
  for (int64_t code0 = 0; code0 < p.codes; code0 += kTileCodes) {
    float acc[4][4] = {};
    for (int64_t d0 = 0; d0 < p.dim; d0 += kTileDim) {
      for (int t = threadIdx.x; t < kTileRows * kTileDim; t += blockDim.x) {
        const int r = t / kTileDim, c = t % kTileDim;
        const int64_t row = row0 + r, dim = d0 + c;
        xs[r][c] = row < p.rows && dim < p.dim ? load_any(p.x_dtype, p.x, row * p.x_row_stride + dim) : 0.0f;
        const int64_t code = code0 + r;
        es[r][c] = code < p.codes && dim < p.dim
                       ? load_any(p.codebook_dtype, p.codebook, code * p.codebook_row_stride + dim)
                       : 0.0f;
      }
      __syncthreads();
      if (code0 == 0) {
#pragma unroll 8
        for (int c = 0; c < kTileDim; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i) x_sq[i] = fmaf(xs[ty + 16 * i][c], xs[ty + 16 * i][c], x_sq[i]);
      }
#pragma unroll 8
      for (int c = 0; c < kTileDim; ++c) {
        float xv[4], ev[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = xs[ty + 16 * i][c];
#pragma unroll
        for (int j = 0; j < 4; ++j) ev[j] = es[tx + 16 * j][c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], ev[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // codes in increasing order: a strict < keeps the lowest on ties
      const int64_t code = code0 + tx + 16 * j;
      if (code >= p.codes) continue;
      const float sq = p.code_sq[code];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = sq - 2.0f * acc[i][j];
        if (d < best[i]) {  // NaN never wins
          best[i] = d;
          best_idx[i] = code;
        }
      }
    }
  }
  // Merge the 16 candidates of each row (lanes ty*16 .. ty*16+15 of one warp half).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v = best[i];
    int64_t k = best_idx[i];
    for (int offset = 8; offset > 0; offset /= 2) {
      const float other_v = __shfl_xor_sync(0xffffffffu, v, offset, 16);
      const int64_t other_k = __shfl_xor_sync(0xffffffffu, k, offset, 16);
      if (before(other_v, other_k, v, k)) {
        v = other_v;
        k = other_k;
      }
    }
    const int64_t row = row0 + ty + 16 * i;
    if (tx == 0 && row < p.rows) {
      // A rounded expansion can dip below 0 for a code equal to x: clamp (NaN stays NaN).
      const float d = v + x_sq[i];
      p.idx[row] = k;
      p.dist[row] = d < 0.0f ? 0.0f : d;
    }
  }
}

// One thread block per (chunk, 256 columns): a thread adds its column over the chunk's rows in
// sorted order (coalesced across the block's threads).
__global__ void __launch_bounds__(256) stats_chunk_kernel(CodebookStatsParams p) {
  const int64_t chunk = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t code = p.chunk_code[chunk];
  if (code >= p.codes || col >= p.dim) return;
  const int64_t count = p.counts[code];
  const int64_t first_chunk = p.chunk_end[code] - (count + kStatsChunkRows - 1) / kStatsChunkRows;
  const int64_t begin = p.starts[code] + (chunk - first_chunk) * kStatsChunkRows;
  const int64_t end = min(begin + kStatsChunkRows, p.starts[code] + count);
  float acc = 0.0f;
  for (int64_t pos = begin; pos < end; ++pos) acc += load_any(p.x_dtype, p.x, p.order[pos] * p.x_row_stride + col);
  p.partial[chunk * p.dim + col] = acc;
}

__global__ void __launch_bounds__(256) stats_merge_kernel(CodebookStatsParams p) {
  const int64_t code = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= p.dim) return;
  const int64_t last = p.chunk_end[code];
  float acc = 0.0f;
  for (int64_t c = last - (p.counts[code] + kStatsChunkRows - 1) / kStatsChunkRows; c < last; ++c)
    acc += p.partial[c * p.dim + col];
  p.sums[code * p.dim + col] = acc;
}

}  // namespace

void codebook_stats(const CodebookStatsParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(256, (p.dim + 31) / 32 * 32));
  const unsigned col_blocks = static_cast<unsigned>((p.dim + threads - 1) / threads);
  stats_chunk_kernel<<<dim3(static_cast<unsigned>(p.max_chunks), col_blocks), threads, 0, stream>>>(p);
  stats_merge_kernel<<<dim3(static_cast<unsigned>(p.codes), col_blocks), threads, 0, stream>>>(p);
}

void nearest_code(const NearestCodeParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((p.rows + kTileRows - 1) / kTileRows);
  nearest_code_kernel<<<blocks, 256, 0, stream>>>(p);
}

}  // namespace pyvae::cuda
