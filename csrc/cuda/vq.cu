// CUDA nearest-code search: a block takes 64 rows of x and walks the codebook 64 codes at a time,
// staging 32-dimension slices of both in shared memory (the tile scheme of code_tile.cuh); the
// tile's dot products come from CUDA cores in float32 (each thread a 4 x 4 block) or, for
// precision="fast" with x and the codebook of one dtype, from the tensor cores (16-bit products, or
// TF32 for float32); each thread keeps, for its 4 rows, the running (min, argmin) over the codes it
// has seen. The 16 threads that share rows then merge their candidates with a shuffle tree that
// prefers the lower index on ties. |x|^2 (which does not change the argmin) comes from the x slices
// of the first code tile and is added at the end. Memory beyond the outputs: none (no N x K matrix).
#include <math.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "code_tile.cuh"
#include "vq.h"

namespace pyvae::cuda {
namespace {

// Merges the 16 candidates of each row (lanes ty*16 .. ty*16+15 of one warp half), adds |x|^2 and
// writes the row's code and distance.
__device__ __forceinline__ void finish_rows(const NearestCodeParams& p, int64_t row0, TileLane lane,
                                            const RunningBest& b) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v = b.best[i];
    int64_t k = b.idx[i];
    merge_row(v, k);
    const int64_t row = row0 + lane.ty + 16 * i;
    if (lane.tx == 0 && row < p.rows) {
      // A rounded expansion can dip below 0 for a code equal to x: clamp (NaN stays NaN).
      const float d = v + b.x_sq[i];
      p.idx[row] = k;
      p.dist[row] = d < 0.0f ? 0.0f : d;
    }
  }
}

// float32 arithmetic on CUDA cores, any input dtypes.
__global__ void __launch_bounds__(256) nearest_code_kernel(NearestCodeParams p) {
  __shared__ float xs[kTileRows][kTileDim + 1];
  __shared__ float es[kTileCodes][kTileDim + 1];
  const TileLane lane = tile_lane();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  RunningBest b;
  init_best(b);
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
          for (int i = 0; i < 4; ++i) b.x_sq[i] = fmaf(xs[lane.ty + 16 * i][c], xs[lane.ty + 16 * i][c], b.x_sq[i]);
      }
      accumulate_slice(&xs[0][0], kTileDim + 1, es, lane, acc);
      __syncthreads();
    }
    fold_tile(p.code_sq, p.codes, code0, lane, [&](int i, int j) { return acc[i][j]; }, b);
  }
  finish_rows(p, row0, lane, b);
}

// WMMA operand types per input dtype: 16-bit inputs multiply as they are (16 x 16 x 16), float32
// ones as TF32 (16 x 16 x 8; the fragments' elements must be rounded to TF32 after loading).
template <typename T> struct WmmaOperand {
  using fragment_type = T;
  static constexpr int kK = 16, kPad = 8;  // pad: 16-byte aligned rows, staggered banks
};
template <> struct WmmaOperand<float> {
  using fragment_type = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8, kPad = 4;
};

template <typename Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment& f) {
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
}

// x and the codebook of one dtype T, 16-bit or (precision="fast") float32: the tile's dot products come from the
// tensor cores with float32 accumulation — for 16-bit T the products are exact (only the
// accumulation order differs from the float32 kernel); for float32 they are TF32. Eight warps each
// compute a 16 x 32 block of the 64 x 64 tile from shared-memory slices, store it to shared
// memory, and the argmin proceeds as in the float32 kernel.
template <typename T>
__global__ void __launch_bounds__(256) nearest_code_wmma_kernel(NearestCodeParams p) {
  using namespace nvcuda;
  using Op = WmmaOperand<T>;
  using FT = typename Op::fragment_type;
  __shared__ __align__(32) T xs[kTileRows][kTileDim + Op::kPad];
  __shared__ __align__(32) T es[kTileCodes][kTileDim + Op::kPad];
  __shared__ __align__(32) float scores[kTileRows][kTileCodes + 4];
  const TileLane lane = tile_lane();
  const int warp = threadIdx.x / 32;
  const int frag_row = 16 * (warp / 2), frag_code = 32 * (warp % 2);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const T* x = static_cast<const T*>(p.x);
  const T* e = static_cast<const T*>(p.codebook);
  RunningBest b;
  init_best(b);
  for (int64_t code0 = 0; code0 < p.codes; code0 += kTileCodes) {
    wmma::fragment<wmma::accumulator, 16, 16, Op::kK, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t d0 = 0; d0 < p.dim; d0 += kTileDim) {
      for (int t = threadIdx.x; t < kTileRows * kTileDim; t += blockDim.x) {
        const int r = t / kTileDim, c = t % kTileDim;
        const int64_t row = row0 + r, dim = d0 + c, code = code0 + r;
        xs[r][c] = row < p.rows && dim < p.dim ? x[row * p.x_row_stride + dim] : from_f32<T>(0.0f);
        es[r][c] = code < p.codes && dim < p.dim ? e[code * p.codebook_row_stride + dim] : from_f32<T>(0.0f);
      }
      __syncthreads();
      if (code0 == 0) {
        for (int c = 0; c < kTileDim; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float v = to_f32(xs[lane.ty + 16 * i][c]);
            b.x_sq[i] = fmaf(v, v, b.x_sq[i]);
          }
      }
#pragma unroll
      for (int k = 0; k < kTileDim; k += Op::kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, Op::kK, FT, wmma::row_major> a;
        wmma::load_matrix_sync(a, &xs[frag_row][k], kTileDim + Op::kPad);
        if constexpr (std::is_same_v<T, float>) round_to_tf32(a);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // B = E^T: element (k, n) is es[n][k], i.e. E's rows read column-major
          wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, FT, wmma::col_major> bt;
          wmma::load_matrix_sync(bt, &es[frag_code + 16 * f][k], kTileDim + Op::kPad);
          if constexpr (std::is_same_v<T, float>) round_to_tf32(bt);
          wmma::mma_sync(acc[f], a, bt, acc[f]);
        }
      }
      __syncthreads();
    }
    wmma::store_matrix_sync(&scores[frag_row][frag_code], acc[0], kTileCodes + 4, wmma::mem_row_major);
    wmma::store_matrix_sync(&scores[frag_row][frag_code + 16], acc[1], kTileCodes + 4, wmma::mem_row_major);
    __syncthreads();
    fold_tile(p.code_sq, p.codes, code0, lane, [&](int i, int j) { return scores[lane.ty + 16 * i][lane.tx + 16 * j]; }, b);
    __syncthreads();  // scores is rewritten by the next tile
  }
  finish_rows(p, row0, lane, b);
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
  // Tensor cores for one shared dtype: 16-bit products are exact, so "exact" takes them too; float32
  // goes through TF32 there, for "fast" only.
  const bool tensor_cores = p.x_dtype == p.codebook_dtype && (!p.exact || p.x_dtype != DType::kFloat32);
  if (!tensor_cores) return void(nearest_code_kernel<<<blocks, 256, 0, stream>>>(p));
  switch (p.x_dtype) {
    case DType::kFloat32: return void(nearest_code_wmma_kernel<float><<<blocks, 256, 0, stream>>>(p));
    case DType::kFloat16: return void(nearest_code_wmma_kernel<__half><<<blocks, 256, 0, stream>>>(p));
    case DType::kBFloat16: return void(nearest_code_wmma_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p));
  }
}

}  // namespace pyvae::cuda
