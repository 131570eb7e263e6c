// Plain-data description of one nearest-code search, filled in by csrc/vq_ops.cpp and read by the
// CUDA kernel (torch-free). x is [rows, dim] and the codebook [codes, dim], each with unit column
// stride; code_sq[k] = |e_k|^2 in float32.
#pragma once
#include <stdint.h>

#include "dtype.h"

namespace pyvae {

struct NearestCodeParams {
  DType x_dtype, codebook_dtype;
  const void* x;
  const void* codebook;
  int64_t x_row_stride, codebook_row_stride;
  int64_t rows, codes, dim;
  const float* code_sq;
  int64_t* idx;  // [rows]
  float* dist;   // [rows]: |x|^2 + min over k of (|e_k|^2 - 2 x.e_k), clamped at 0
  bool exact;    // false: TF32 tensor cores for float32 too (16-bit x and codebook of one dtype use them always)
};

// Per-code sums of the rows of x [rows, dim] (unit column stride), deterministic: the rows sorted by
// code (order), each code's rows cut into chunks of kStatsChunkRows summed by one thread block each
// into partial[chunk], then each code's chunk sums added in order into sums[code]. Chunk c belongs
// to code chunk_code[c] (codes for c past the last chunk); code k's chunks end at chunk_end[k]
// (inclusive prefix sum of ceil(counts / kStatsChunkRows)), its rows start at order[starts[k]].
// The order of the sums, and so their rounding, depends on it: the Triton kernels read it from here
// too (pyvae._C.shared_constants(), see module.cpp), and both GPU backends share the preparation
// of order, starts, chunk_end and chunk_code (kernels/_layout.py codebook_stats_by_chunks).
constexpr int64_t kStatsChunkRows = 64;

struct CodebookStatsParams {
  DType x_dtype;
  const void* x;
  int64_t x_row_stride, rows, dim, codes;
  const int64_t* order;       // [rows]
  const int64_t* starts;      // [codes]
  const int64_t* counts;      // [codes]
  const int64_t* chunk_end;   // [codes]
  const int64_t* chunk_code;  // [max_chunks]
  int64_t max_chunks;         // min(rows, codes + ceil(rows / kStatsChunkRows)) >= the number of chunks
  float* partial;             // [max_chunks, dim]
  float* sums;                // [codes, dim]
};

}  // namespace pyvae
