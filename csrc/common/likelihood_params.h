// Plain-data description of one likelihood call, filled in by csrc/likelihood_ops.cpp and read by
// the CPU and CUDA kernels. prediction and target are viewed as [rows, cols] (rows = batch, cols =
// the rest) with unit column stride; logvar, when given, is float32 [1 or rows, cols].
#pragma once
#include <stdint.h>

#include "dtype.h"
#include "likelihood_math.h"

namespace pyvae {

struct LikelihoodInputs {
  Loss loss;
  DType pred_dtype, target_dtype;
  const void* pred;
  const void* target;
  int64_t pred_row_stride, target_row_stride;
  int64_t rows, cols;
  const float* logvar;  // nullptr: every element uses fixed_logvar
  int64_t logvar_row_stride;  // 0 (shared by the batch) or cols
  float fixed_logvar;
  float constant;  // added to every element's loss (0.5 log 2 pi for a full Gaussian)
};

// Column blocks: a row is summed in blocks of this many columns, whose partial sums are then added
// in block order, so long rows can be split across threads or thread blocks and the result still
// does not depend on how many there are. Every backend's per-sample sums depend on it, so the
// Triton kernels read it from here too (pyvae._C.shared_constants(), see module.cpp).
constexpr int64_t kLikelihoodColumnBlock = 16384;

// A log-variance shared by the whole batch (per pixel, per channel, a scalar) gets its gradient
// summed over the batch: the kernels add the derivatives of each group of this many consecutive
// rows in row order and write one partial row per group (the caller adds the groups in order), so
// the buffer is that many times smaller than the prediction and forward+backward keeps one full
// gradient buffer, not two. The op's output shape depends on it (exported like the column block).
constexpr int64_t kLogvarGroupRows = 16;

// The bits of likelihood_forward's `flags`: what its one pass returns besides the per-sample losses
// (exported by pyvae._C.shared_constants(), so the Python side composes them by name).
namespace likelihood_flags {
constexpr int64_t kPerElement = 1 << 0;   // the losses per element instead of per sample
constexpr int64_t kGradPred = 1 << 1;     // the derivatives with respect to the prediction,
constexpr int64_t kGradTarget = 1 << 2;   // the target,
constexpr int64_t kGradLogvar = 1 << 3;   // the log-variance (needs a logvar)
// a log-variance shared by the batch gets its derivatives as sums over groups of kLogvarGroupRows
// rows (for an upstream gradient that is the same for every row: a scalar loss)
constexpr int64_t kGroupLogvarGrad = 1 << 4;
constexpr int64_t kAll = kPerElement | kGradPred | kGradTarget | kGradLogvar | kGroupLogvarGrad;
}  // namespace likelihood_flags

// One pass over prediction and target: the per-element or per-row losses and, where asked, the
// derivatives of each element's loss with respect to its prediction, target and log-variance,
// times grad_scale (the reduction's factor: 1/B for "batchmean"), i.e. the gradients of the reduced
// loss at a unit upstream gradient: autograd's backward only has to scale them, and skips even that
// when the upstream gradient is 1 (loss.backward()).
struct LikelihoodParams {
  LikelihoodInputs in;
  float* loss;  // [rows, cols] if per_element else partial sums [rows, column_blocks]
  bool per_element;
  void* grad_pred;      // [rows, cols] in pred_dtype, or nullptr
  void* grad_target;    // [rows, cols] in target_dtype, or nullptr
  // float32 [ceil(rows / logvar_group_rows), cols], row g the sum of the derivatives of rows
  // g * logvar_group_rows ... (reduced to logvar's shape by the caller), or nullptr
  float* grad_logvar;
  int64_t logvar_group_rows;  // kLogvarGroupRows when logvar is shared by the batch, else 1
  float grad_scale;     // multiplies every derivative
};

PYVAE_HD int64_t column_blocks(int64_t cols) { return (cols + kLikelihoodColumnBlock - 1) / kLikelihoodColumnBlock; }

PYVAE_HD int64_t row_groups(int64_t rows, int64_t group_rows) { return (rows + group_rows - 1) / group_rows; }

}  // namespace pyvae
