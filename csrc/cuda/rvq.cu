// CUDA residual vector quantisation: one launch runs every stage. A block takes 64 rows through all
// Q stages in turn; each stage is nearest_code's float32 CUDA-core search (the tile scheme of
// code_tile.cuh: 64 x 64 tiles, 32 dimensions per shared-memory slice, a running (min, argmin) per
// thread, shuffle merge preferring the lower index), after which a warp per row subtracts the chosen
// code from the residual and sums the square of the new residual (the stage's dist). The quantized
// sum is gathered at the end from the indices the block wrote: 0 + c_0 + c_1 + ... in float32, in
// stage order, rounded to x's dtype.
//
// Where the residual lives: rows of up to 352 values keep the block's float32 residual in dynamic
// shared memory (at most kMaxResidentBytes, opted in above the default 48 KiB); wider rows, whose
// residual tile would not fit, recompute each residual value they need from x and the codes chosen
// before (the same float32 subtractions in the same order, so the same values), trading repeated
// reads of codes (mostly from the L1/L2 caches) for no scratch memory. Either way nothing beyond the
// outputs is allocated: no N x K matrix, no residual per stage.
//
// `exact` is not read: both precisions take float32 products on CUDA cores (no tensor-core path
// yet, such as nearest_code's WMMA one).
#include "rvq.h"

#include "code_tile.cuh"

namespace pyvae::cuda {
namespace {

// Bounded so that two blocks fit an sm_90 SM and one an sm_80 SM, with the static tiles.
constexpr int64_t kMaxResidentBytes = 96 * 1024;

// Row stride of the resident residual: whole 32-column slices (zero past D, so a slice's products
// need no bound check) plus one column, so that the two rows a warp reads at once fall in different
// banks.
__host__ __device__ inline int64_t resident_ld(int64_t dim) { return (dim + kTileDim - 1) / kTileDim * kTileDim + 1; }

__device__ __forceinline__ float code_value(const ResidualCodeParams& p, int64_t stage, int64_t code, int64_t d) {
  return load_any(p.codebook_dtype, p.codebooks, (stage * p.codes + code) * p.dim + d);
}

// r_q[row][d] = float32(x) minus the codes chosen at stages 0 .. q-1, in stage order (p.idx holds
// them: this block wrote them before a __syncthreads).
__device__ float recomputed_residual(const ResidualCodeParams& p, int64_t row, int64_t d, int64_t q) {
  float r = load_any(p.x_dtype, p.x, row * p.x_row_stride + d);
  for (int64_t s = 0; s < q; ++s) r -= code_value(p, s, p.idx[row * p.stages + s], d);
  return r;
}

// kResident: rs is the block's residual [kTileRows][resident_ld(D)]; else one slice of it,
// [kTileRows][kTileDim + 1], rebuilt for every code tile.
template <bool kResident>
__global__ void __launch_bounds__(256) residual_code_kernel(ResidualCodeParams p) {
  extern __shared__ float rs[];
  __shared__ float es[kTileCodes][kTileDim + 1];
  __shared__ int64_t chosen[kTileRows];
  const TileLane lane = tile_lane();
  const int warp = threadIdx.x / 32, warp_lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t ld = kResident ? resident_ld(p.dim) : kTileDim + 1;
  if constexpr (kResident) {
    for (int64_t t = threadIdx.x; t < kTileRows * ld; t += blockDim.x) {
      const int64_t row = row0 + t / ld, d = t % ld;
      rs[t] = row < p.rows && d < p.dim ? load_any(p.x_dtype, p.x, row * p.x_row_stride + d) : 0.0f;
    }
    __syncthreads();
  }
  for (int64_t q = 0; q < p.stages; ++q) {
    RunningBest b;
    init_best(b);
    for (int64_t code0 = 0; code0 < p.codes; code0 += kTileCodes) {
      float acc[4][4] = {};
      for (int64_t d0 = 0; d0 < p.dim; d0 += kTileDim) {
        for (int t = threadIdx.x; t < kTileRows * kTileDim; t += blockDim.x) {
          const int r = t / kTileDim, c = t % kTileDim;
          const int64_t code = code0 + r, row = row0 + r, d = d0 + c;
          es[r][c] = code < p.codes && d < p.dim ? code_value(p, q, code, d) : 0.0f;
          if constexpr (!kResident)
            rs[r * ld + c] = row < p.rows && d < p.dim ? recomputed_residual(p, row, d, q) : 0.0f;
        }
        __syncthreads();
        accumulate_slice(kResident ? rs + d0 : rs, ld, es, lane, acc);
        __syncthreads();
      }
      fold_tile(p.code_sq + q * p.codes, p.codes, code0, lane, [&](int i, int j) { return acc[i][j]; }, b);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      merge_row(b.best[i], b.idx[i]);
      if (lane.tx == 0) chosen[lane.ty + 16 * i] = b.idx[i];
    }
    __syncthreads();
    // A warp per row, lanes 32 columns apart, then a shuffle tree: a fixed order of the squares.
    for (int r = warp; r < kTileRows; r += blockDim.x / 32) {
      const int64_t row = row0 + r;
      if (row >= p.rows) break;  // uniform in the warp
      const int64_t code = chosen[r];
      float sq = 0.0f;
      for (int64_t d = warp_lane; d < p.dim; d += 32) {
        const float v = (kResident ? rs[r * ld + d] : recomputed_residual(p, row, d, q)) - code_value(p, q, code, d);
        if constexpr (kResident) rs[r * ld + d] = v;
        sq = fmaf(v, v, sq);
      }
      for (int offset = 16; offset > 0; offset /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
      if (warp_lane == 0) {
        p.idx[row * p.stages + q] = code;
        p.dist[row * p.stages + q] = sq;
      }
    }
    __syncthreads();
  }
  for (int64_t t = threadIdx.x; t < kTileRows * p.dim; t += blockDim.x) {
    const int64_t row = row0 + t / p.dim, d = t % p.dim;
    if (row >= p.rows) break;  // t only grows
    float sum = 0.0f;
    for (int64_t q = 0; q < p.stages; ++q) sum += code_value(p, q, p.idx[row * p.stages + q], d);
    store_any(p.x_dtype, p.quantized, row * p.dim + d, sum);
  }
}

}  // namespace

void residual_code(const ResidualCodeParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((p.rows + kTileRows - 1) / kTileRows);
  const int64_t resident_bytes = static_cast<int64_t>(sizeof(float)) * kTileRows * resident_ld(p.dim);
  if (resident_bytes <= kMaxResidentBytes) {
    // above 48 KiB of shared memory a kernel must opt in (per device: set at every launch)
    cudaFuncSetAttribute(residual_code_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(resident_bytes));
    residual_code_kernel<true><<<blocks, 256, static_cast<size_t>(resident_bytes), stream>>>(p);
  } else {
    residual_code_kernel<false><<<blocks, 256, sizeof(float) * kTileRows * (kTileDim + 1), stream>>>(p);
  }
}

}  // namespace pyvae::cuda
