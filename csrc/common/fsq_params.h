// Plain-data description of one finite-scalar-quantization call, filled in by csrc/fsq_ops.cpp and
// read by the CPU and CUDA kernels. z, grad_codes: [rows, dims] with unit column stride and the given
// row strides; codes and grad_z contiguous [rows, dims]; indices [rows].
#pragma once
#include <math.h>
#include <stdint.h>

#include "dtype.h"

namespace pyvae {

// Levels >= 2 whose product is below 2^31 (int32 indices): at most 30 of them.
constexpr int kFsqMaxDims = 30;
constexpr double kFsqEps = 1e-3;     // the plain bound's margin (pyvae/kernels/contracts/fsq.py: EPS)
constexpr int32_t kFsqNanIndex = -1;  // the index of a row with a NaN in z

// One dimension's constants (kernels/contracts/fsq.py: DimConstants, the same formulas):
//   plain bound:      level = round(tanh(z + shift) * scale - offset) + center
//   symmetric bound:  level = floor(scale * (tanh(z + shift) + 1) / 2 + 0.5)
//   both:             code = (level - center) / center, d code / dz = (1 - tanh(z + shift)^2) * grad_scale
struct FsqDim {
  float shift, scale, offset, center, grad_scale;
  float inv_center;  // 1 / center, rounded
  uint32_t basis;    // prod(levels[:j]) < 2^31
  int32_t levels;    // L
};

struct FsqLevels {
  int64_t dims;
  bool symmetric;  // preserve_symmetry: the symmetric bound
  // every code of every dimension is (level - center) * inv_center exactly, the correctly rounded
  // quotient (checked for up to kFsqReciprocalCheck levels a dimension): the CPU kernel multiplies
  bool exact_reciprocal;
  FsqDim dim[kFsqMaxDims];
};

constexpr int64_t kFsqReciprocalCheck = 256;

// Whether (level - center) * inv_center equals (level - center) / center for each of the L levels
// (both rounded once: the same float arithmetic as the kernel's). True for L up to 11 and 16 to 19
// under the plain bound, up to 7 and 9 to 11 under the symmetric one; false for L = 12 (center 6),
// symmetric 8 (center 3.5) and many larger L.
inline bool fsq_reciprocal_is_exact(int64_t levels, const FsqDim& d) {
  if (levels > kFsqReciprocalCheck) return false;
  for (int64_t level = 0; level < levels; ++level) {
    const float numerator = static_cast<float>(level) - d.center;  // exact: small integers and halves
    if (numerator * d.inv_center != numerator / d.center) return false;
  }
  return true;
}

// The constants of `levels` (checked: dims <= kFsqMaxDims, each >= 2, product < 2^31), computed in
// double and rounded once to float, as the Python side (Triton, the reference) computes them.
inline FsqLevels fsq_levels(const int64_t* levels, int64_t dims, bool symmetric) {
  FsqLevels out{};
  out.dims = dims;
  out.symmetric = symmetric;
  out.exact_reciprocal = true;
  int64_t basis = 1;
  for (int64_t j = 0; j < dims; ++j) {
    const int64_t level = levels[j];
    FsqDim& d = out.dim[j];
    if (symmetric) {
      d = FsqDim{0.0f, static_cast<float>(level - 1), 0.0f, static_cast<float>((level - 1) / 2.0), 1.0f, 0.0f, 0, 0};
    } else {
      const double half_l = static_cast<double>(level - 1) * (1.0 + kFsqEps) / 2.0;
      const double offset = level % 2 == 0 ? 0.5 : 0.0;
      const double half_width = static_cast<double>(level / 2);
      d = FsqDim{static_cast<float>(atanh(offset / half_l)), static_cast<float>(half_l), static_cast<float>(offset),
                 static_cast<float>(half_width), static_cast<float>(half_l / half_width), 0.0f, 0, 0};
    }
    d.inv_center = static_cast<float>(1.0 / static_cast<double>(d.center));
    d.basis = static_cast<uint32_t>(basis);
    d.levels = static_cast<int32_t>(level);
    out.exact_reciprocal = out.exact_reciprocal && fsq_reciprocal_is_exact(level, d);
    basis *= level;
  }
  return out;
}

// Where the level steps up: the z (in double, to be rounded to float) from which a value of a
// dimension of `levels` levels has at least level i (0 < i < levels). The level is a non-decreasing
// function of z, so it is the number of these thresholds at or below z: the CPU kernel counts them
// for up to kFsqMaxThresholdLevels levels instead of evaluating tanh (the same level but where z lies
// within an ulp or so of a step, as between any two tanh). Plain bound: round(bounded) steps at
// bounded = i - L // 2 - 1/2, tanh(z + shift) = (i - L // 2 - 1/2 + offset) / half_l; symmetric bound:
// the floor steps at (L - 1)(tanh(z) + 1) / 2 + 1/2 = i.
constexpr int64_t kFsqMaxThresholdLevels = 16;

inline double fsq_threshold(int64_t levels, bool symmetric, int64_t i) {
  if (symmetric) return atanh((2.0 * static_cast<double>(i) - 1.0) / static_cast<double>(levels - 1) - 1.0);
  const double half_l = static_cast<double>(levels - 1) * (1.0 + kFsqEps) / 2.0;
  const double offset = levels % 2 == 0 ? 0.5 : 0.0;
  return atanh((static_cast<double>(i - levels / 2) - 0.5 + offset) / half_l) - atanh(offset / half_l);
}

struct FsqForwardParams {
  DType dtype;
  const void* z;
  int64_t rows, z_row_stride;
  void* codes;       // [rows, dims], z's dtype
  int32_t* indices;  // [rows], or nullptr: not asked for
  FsqLevels levels;
};

struct FsqBackwardParams {
  DType dtype;  // of z, grad_codes and grad_z
  const void* z;
  const void* grad_codes;
  int64_t rows, z_row_stride, grad_codes_row_stride;
  void* grad_z;  // [rows, dims]
  FsqLevels levels;
};

}  // namespace pyvae
