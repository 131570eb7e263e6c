// Per-element formulas of finite scalar quantization (pyvae/ops/fsq.py has the definition and the
// float64 reference), shared by the CPU and CUDA kernels: the bounded value's level, its code, the
// level's share of the index, and the straight-through derivative. Each dimension's constants are
// FsqDim's (fsq_params.h). Written branch-free over floats so that g++ vectorises the CPU loops.
#pragma once
#include <math.h>
#include <stdint.h>

#include "hd.h"
#include "vmath.h"

namespace pyvae {

// e^-x for x in [0, 88], no NaN: exp_neg's steps without its NaN case, which g++ would carry
// through the divisions that use the result as a second copy of them. Flushed to 0 below FLT_MIN.
PYVAE_HD float fsq_exp_neg(float x) {
  const float k = round_nearest(x * kLog2e);
  const float y = exp_reduced(k * kLn2High - x + k * kLn2Low);
  return x < 87.33654f ? y * pow2i(-static_cast<int32_t>(k > 126.0f ? 126.0f : k)) : 0.0f;
}

// 1 / x for x in [1, 2], to an ulp (correctly rounded for all but 0.04% of x with fused multiply-adds,
// 17% without): a linear first guess (error below 1/17), then three Newton steps, each squaring the
// error. Seven multiply-adds, where a vector division is the slowest instruction of these kernels.
PYVAE_HD float fsq_reciprocal_1_2(float x) {
  float r = 1.4117647f - 0.47058824f * x;  // 24/17 - 8/17 x
  r = r + r * (1.0f - x * r);
  r = r + r * (1.0f - x * r);
  return r + r * (1.0f - x * r);
}

// tanh(v) and its derivative 1 - tanh(v)^2, from one e = exp(-2|v|): tanh|v| = (1 - e) / (1 + e) and
// 1 - tanh^2 = 4e / (1 + e)^2, the latter without the cancellation of 1 - t^2 where |t| nears 1.
// NaN gives NaN for both; +-inf gives +-1 and 0.
struct FsqTanh {
  float value, slope;
};

PYVAE_HD FsqTanh fsq_tanh(float v) {
  // |v| capped at 44 (tanh is +-1 in float long before, and e = exp(-88) flushes to 0), NaN too:
  // restored at the end
  const float a = fabsf(v) < 44.0f ? fabsf(v) : 44.0f;
  const float e = fsq_exp_neg(2.0f * a);
  const float r = fsq_reciprocal_1_2(1.0f + e);
  const float t = (1.0f - e) * r;
  const bool nan = v != v;
  return FsqTanh{nan ? v : v < 0.0f ? -t : t, nan ? v : 4.0f * e * r * r};
}

// Round half to even (torch.round) for every float: vmath's round_nearest covers |v| < 2^22 only,
// and a level may be as large as 2^31. Adding 2^23 (with v's sign) leaves no fraction bits; from
// 2^23 up every float is an integer already. NaN stays NaN.
PYVAE_HD float fsq_round(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  constexpr float kNoFraction = 8388608.0f;  // 2^23
  const float magic = v < 0.0f ? -kNoFraction : kNoFraction;
  const float rounded = (v + magic) - magic;
  return fabsf(v) < kNoFraction ? rounded : v;
#endif
}

// floor(v), through fsq_round (floorf is a libm call on the baseline x86-64 ISA, which stops g++
// vectorising). NaN stays NaN.
PYVAE_HD float fsq_floor(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  const float rounded = fsq_round(v);
  return rounded > v ? rounded - 1.0f : rounded;
#endif
}

// The level (an integer, as a float; NaN for NaN) of t = tanh(z + shift) under the plain bound:
// round(t * half_l - offset) + L // 2 (the peer's round(bounded), shifted to start at 0) ...
PYVAE_HD float fsq_plain_level(float t, float scale, float offset, float center) {
  return fsq_round(t * scale - offset) + center;
}

// ... and under the symmetric bound: floor((L - 1) (t + 1) / 2 + 0.5), in the peer's order of
// operations.
PYVAE_HD float fsq_symmetric_level(float t, float scale) { return fsq_floor(scale * (t + 1.0f) * 0.5f + 0.5f); }

// A level's code, (level - center) / center: one correctly rounded division of the exact value, so
// every backend writes the same float (the peer's round(bounded) / (L // 2) for the plain bound).
PYVAE_HD float fsq_code(float level, float center) { return (level - center) / center; }

// A level as an int32 for the index: 0 for NaN (whose row's index is kFsqNanIndex), and clamped to
// the int32 range so that the conversion is defined for any float (levels on the grid are exact).
PYVAE_HD int32_t fsq_level_int(float level) {
  const float defined = level == level ? level : 0.0f;
  const float low = defined < -2147483648.0f ? -2147483648.0f : defined;
  return static_cast<int32_t>(low > 2147483520.0f ? 2147483520.0f : low);  // the largest float below 2^31
}

// The straight-through derivative d code / dz: the bound's slope (the rounding passes the gradient
// through unchanged), times grad_scale = half_l / (L // 2) (plain) or 1 (symmetric).
PYVAE_HD float fsq_grad(float grad_code, float z, float shift, float grad_scale) {
  return grad_code * (fsq_tanh(z + shift).slope * grad_scale);
}

}  // namespace pyvae
