// CPU kernels of finite scalar quantization. z is walked in tiles of whole rows (up to kTile
// elements, [row][dim] as in memory) spread over torch's intra-op threads. Each dimension's
// constants are laid out once per thread in the same [row][dim] pattern (TileConstants), so that the
// element math of a tile is one straight loop over its elements that g++ vectorises, whatever the
// number of levels; the indices are then summed row by row from the tile's levels. With at most
// kFsqMaxThresholdLevels levels a dimension (the usual FSQ: 8, 5, 5, 5), the forward counts the
// thresholds at or below z (fsq_params.h: fsq_threshold) instead of evaluating tanh: a compare and
// an add per level, where tanh is an exponential and a reciprocal.
#include "fsq.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "../common/fsq_math.h"
#include "chunk.h"

namespace pyvae::cpu {
namespace {

constexpr int64_t kTile = 256;  // elements per tile: at least 8 whole rows (dims <= kFsqMaxDims)
static_assert(kTile >= kFsqMaxDims, "a tile holds at least one row");

// Each dimension's constants repeated over the rows of a tile (as many rows as the call has, up to
// a tile's).
struct TileConstants {
  alignas(64) float shift[kTile];
  alignas(64) float scale[kTile];
  alignas(64) float offset[kTile];
  alignas(64) float center[kTile];
  alignas(64) float inv_center[kTile];
  alignas(64) float grad_scale[kTile];
  alignas(64) uint32_t basis[kTile];

  TileConstants(const FsqLevels& levels, int64_t rows) {
    const int64_t dims = levels.dims;
    for (int64_t j = 0; j < dims; ++j) {
      const FsqDim& d = levels.dim[j];
      shift[j] = d.shift;
      scale[j] = d.scale;
      offset[j] = d.offset;
      center[j] = d.center;
      inv_center[j] = d.inv_center;
      grad_scale[j] = d.grad_scale;
      basis[j] = d.basis;
    }
    for (int64_t e = dims; e < rows * dims; ++e) {  // the first row, repeated
      shift[e] = shift[e - dims];
      scale[e] = scale[e - dims];
      offset[e] = offset[e - dims];
      center[e] = center[e - dims];
      inv_center[e] = inv_center[e - dims];
      grad_scale[e] = grad_scale[e - dims];
      basis[e] = basis[e - dims];
    }
  }
};

// Where each element's level steps up, [step][row][dim]: its dimension's thresholds, then NaN past its
// L - 1 (no z, +inf included, is at or above a NaN). For a call whose levels are all
// kFsqMaxThresholdLevels or fewer.
// Counted kStepsPerPass thresholds to a pass over the tile: the rows past `steps` up to a multiple
// of it are NaN too.
constexpr int64_t kStepsPerPass = 4;

struct TileThresholds {
  alignas(64) float at[(kFsqMaxThresholdLevels + kStepsPerPass - 2) / kStepsPerPass * kStepsPerPass][kTile];
  int64_t steps;  // the most thresholds of a dimension: the largest L - 1

  TileThresholds(const FsqLevels& levels, int64_t rows) : steps(0) {
    const int64_t dims = levels.dims;
    for (int64_t j = 0; j < dims; ++j) steps = std::max<int64_t>(steps, levels.dim[j].levels - 1);
    for (int64_t i = 0; i < (steps + kStepsPerPass - 1) / kStepsPerPass * kStepsPerPass; ++i) {
      for (int64_t j = 0; j < dims; ++j) {
        const int64_t count = levels.dim[j].levels;
        at[i][j] = i + 1 < count ? static_cast<float>(fsq_threshold(count, levels.symmetric, i + 1)) : NAN;
      }
      for (int64_t e = dims; e < rows * dims; ++e) at[i][e] = at[i][e - dims];
    }
  }
};

bool by_thresholds(const FsqLevels& levels) {
  for (int64_t j = 0; j < levels.dims; ++j)
    if (levels.dim[j].levels > kFsqMaxThresholdLevels) return false;
  return true;
}

// `rows` rows of `dims` values at base (row stride row_stride, unit column stride) as floats,
// [row][dim]: the memory itself for contiguous float32 rows, else converted into `buffer`.
template <typename T>
const float* load_rows(const T* base, int64_t rows, int64_t dims, int64_t row_stride, float* __restrict buffer) {
  if (row_stride == dims || rows == 1) return as_float(base, rows * dims, buffer);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < dims; ++j) buffer[r * dims + j] = static_cast<float>(base[r * row_stride + j]);
  }
  return buffer;
}

// A level's code and, for the indices, the level times its dimension's basis (uint32: wraps, defined,
// where levels off the grid overflow it) and a mask of the NaN levels (all ones). The code's
// division is by the reciprocal where fsq_levels found that exact.
template <bool kReciprocal>
inline __attribute__((always_inline)) void store_level(float level, int64_t e, const TileConstants& c,
                                                       float* __restrict code, uint32_t* __restrict weighted,
                                                       uint32_t* __restrict nan_mask) {
  code[e] = kReciprocal ? (level - c.center[e]) * c.inv_center[e] : fsq_code(level, c.center[e]);
  weighted[e] = static_cast<uint32_t>(fsq_level_int(level)) * c.basis[e];
  nan_mask[e] = level != level ? ~0u : 0u;
}

// The codes, weighted levels and NaN masks of a tile's n elements by the bound's formula. The bound
// and the division are template constants: as run-time choices inside the loop they would stop g++
// vectorising it (and a vector division is its slowest instruction).
template <bool kSymmetric, bool kReciprocal>
inline __attribute__((always_inline)) void codes_by_tanh(const float* __restrict z, const TileConstants& c, int64_t n,
                                                         float* __restrict code, uint32_t* __restrict weighted,
                                                         uint32_t* __restrict nan_mask) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float t = fsq_tanh(z[e] + c.shift[e]).value;
    const float level = kSymmetric ? fsq_symmetric_level(t, c.scale[e])
                                   : fsq_plain_level(t, c.scale[e], c.offset[e], c.center[e]);
    store_level<kReciprocal>(level, e, c, code, weighted, nan_mask);
  }
}

// The same by counting thresholds, kStepsPerPass steps to a pass over the tile (a loop over a
// run-time number of steps inside the loop over the elements stops g++ vectorising it). NaN: a NaN
// level.
inline __attribute__((always_inline)) float steps_at_or_below(float z, const float* __restrict at, int64_t e) {
  return (z >= at[e] ? 1.0f : 0.0f) + (z >= at[kTile + e] ? 1.0f : 0.0f) + (z >= at[2 * kTile + e] ? 1.0f : 0.0f) +
         (z >= at[3 * kTile + e] ? 1.0f : 0.0f);
}

template <bool kReciprocal>
inline __attribute__((always_inline)) void codes_by_thresholds(const float* __restrict z, const TileConstants& c,
                                                               const TileThresholds& th, int64_t n,
                                                               float* __restrict code, uint32_t* __restrict weighted,
                                                               uint32_t* __restrict nan_mask) {
  static_assert(kStepsPerPass == 4, "steps_at_or_below counts four");
  alignas(64) float level[kTile];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) level[e] = steps_at_or_below(z[e], th.at[0], e);  // every L >= 2: a step
  for (int64_t i = kStepsPerPass; i < th.steps; i += kStepsPerPass) {
    const float* __restrict at = th.at[i];
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) level[e] += steps_at_or_below(z[e], at, e);
  }
#pragma omp simd
  for (int64_t e = 0; e < n; ++e)
    store_level<kReciprocal>(z[e] != z[e] ? z[e] : level[e], e, c, code, weighted, nan_mask);
}

PYVAE_MULTIVERSION void codes_and_weights(const float* __restrict z, const TileConstants& c,
                                          const TileThresholds* th, const FsqLevels& levels, int64_t n,
                                          float* __restrict code, uint32_t* __restrict weighted,
                                          uint32_t* __restrict nan_mask) {
  if (th != nullptr) {
    if (levels.exact_reciprocal) return codes_by_thresholds<true>(z, c, *th, n, code, weighted, nan_mask);
    return codes_by_thresholds<false>(z, c, *th, n, code, weighted, nan_mask);
  }
  if (levels.symmetric) {
    if (levels.exact_reciprocal) return codes_by_tanh<true, true>(z, c, n, code, weighted, nan_mask);
    return codes_by_tanh<true, false>(z, c, n, code, weighted, nan_mask);
  }
  if (levels.exact_reciprocal) return codes_by_tanh<false, true>(z, c, n, code, weighted, nan_mask);
  codes_by_tanh<false, false>(z, c, n, code, weighted, nan_mask);
}

// Each row's index: the sum of its weighted levels, or all ones (kFsqNanIndex) where a level is
// NaN. kDims at compile time where it is small, so that g++ vectorises the loop over rows (the
// row's values an interleaved group); any other count: kDims = 0 and `dims` at run time.
template <int kDims>
PYVAE_MULTIVERSION void row_indices(const uint32_t* __restrict weighted, const uint32_t* __restrict nan_mask,
                                    int64_t rows, int64_t dims, int32_t* __restrict out) {
  const int64_t d = kDims > 0 ? kDims : dims;
  static_assert(kFsqNanIndex == -1, "a NaN row's index is all ones");
#pragma omp simd
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t index = 0, nan = 0;
    for (int64_t j = 0; j < d; ++j) {
      index += weighted[r * d + j];
      nan |= nan_mask[r * d + j];
    }
    out[r] = static_cast<int32_t>(index | nan);
  }
}

void indices(const uint32_t* weighted, const uint32_t* nan_mask, int64_t rows, int64_t dims, int32_t* out) {
  switch (dims) {
    case 3: return row_indices<3>(weighted, nan_mask, rows, dims, out);
    case 4: return row_indices<4>(weighted, nan_mask, rows, dims, out);
    case 5: return row_indices<5>(weighted, nan_mask, rows, dims, out);
    case 6: return row_indices<6>(weighted, nan_mask, rows, dims, out);
    case 8: return row_indices<8>(weighted, nan_mask, rows, dims, out);
    default: return row_indices<0>(weighted, nan_mask, rows, dims, out);
  }
}

PYVAE_MULTIVERSION void grads(const float* __restrict z, const float* __restrict grad_codes,
                              const float* __restrict shift, const float* __restrict grad_scale, int64_t n,
                              float* __restrict grad_z) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) grad_z[e] = fsq_grad(grad_codes[e], z[e], shift[e], grad_scale[e]);
}

// Runs a thread's work over its tiles of whole rows, `rows` rows of `dims` values in all, spread over
// torch's intra-op threads (about 32k values a task, so that small calls stay on one thread).
// make_work(tile_rows) builds a task's work (its constants and buffers, for tiles of up to tile_rows
// rows) once; work(first_row, rows) does one tile.
// A tile's rows are a multiple of kVectorRows where a tile holds that many, so that its element
// loops run in whole AVX-512 vectors: 51 rows of 5 values (255 elements) left 15 to a scalar
// remainder in every tile, which took as long as the other 240.
constexpr int64_t kVectorRows = 16;

template <typename MakeWork>
void over_tiles(int64_t rows, int64_t dims, const MakeWork& make_work) {
  const int64_t fit = kTile / dims;
  const int64_t rows_per_tile = fit >= kVectorRows ? fit / kVectorRows * kVectorRows : fit;
  const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 32768 / kTile), [&](int64_t begin, int64_t end) {
    auto work = make_work(std::min(rows_per_tile, rows));
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first_row = tile * rows_per_tile;
      work(first_row, std::min(rows_per_tile, rows - first_row));
    }
  });
}

// A task's forward: the codes and (if asked) the indices of its tiles.
template <typename T>
struct ForwardWork {
  const FsqForwardParams& p;
  const TileConstants c;
  std::optional<TileThresholds> th;
  alignas(64) float z_buffer[kTile], code_buffer[kTile];
  alignas(64) uint32_t weighted[kTile], nan_mask[kTile];

  ForwardWork(const FsqForwardParams& params, int64_t tile_rows) : p(params), c(params.levels, tile_rows) {
    if (by_thresholds(p.levels)) th.emplace(p.levels, tile_rows);
  }

  void operator()(int64_t row0, int64_t rows) {
    const int64_t dims = p.levels.dims, n = rows * dims;
    const float* z =
        load_rows(static_cast<const T*>(p.z) + row0 * p.z_row_stride, rows, dims, p.z_row_stride, z_buffer);
    T* codes = static_cast<T*>(p.codes) + row0 * dims;
    float* code = float_target(codes, code_buffer);
    codes_and_weights(z, c, th ? &*th : nullptr, p.levels, n, code, weighted, nan_mask);
    store_chunk(code, n, codes);
    if (p.indices != nullptr) indices(weighted, nan_mask, rows, dims, p.indices + row0);
  }
};

// A task's backward: the gradient of its tiles.
template <typename T>
struct BackwardWork {
  const FsqBackwardParams& p;
  const TileConstants c;
  alignas(64) float z_buffer[kTile], grad_buffer[kTile], out_buffer[kTile];

  BackwardWork(const FsqBackwardParams& params, int64_t tile_rows) : p(params), c(params.levels, tile_rows) {}

  void operator()(int64_t row0, int64_t rows) {
    const int64_t dims = p.levels.dims, n = rows * dims;
    const float* z =
        load_rows(static_cast<const T*>(p.z) + row0 * p.z_row_stride, rows, dims, p.z_row_stride, z_buffer);
    const float* grad_codes = load_rows(static_cast<const T*>(p.grad_codes) + row0 * p.grad_codes_row_stride, rows,
                                        dims, p.grad_codes_row_stride, grad_buffer);
    T* grad_z = static_cast<T*>(p.grad_z) + row0 * dims;
    float* out = float_target(grad_z, out_buffer);
    grads(z, grad_codes, c.shift, c.grad_scale, n, out);
    store_chunk(out, n, grad_z);
  }
};

}  // namespace

void fsq_forward(const FsqForwardParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    over_tiles(p.rows, p.levels.dims, [&](int64_t tile_rows) { return ForwardWork<decltype(type)>(p, tile_rows); });
  });
}

void fsq_backward(const FsqBackwardParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    over_tiles(p.rows, p.levels.dims, [&](int64_t tile_rows) { return BackwardWork<decltype(type)>(p, tile_rows); });
  });
}

}  // namespace pyvae::cpu
