// Branch-free float32 exp / log / sincos that g++ auto-vectorises (libm calls block SIMD) and that
// nvcc compiles unchanged, so the CPU and CUDA kernels round the same way. Coefficients are the
// Cephes single-precision minimax polynomials (about 1 ulp on the reduced ranges).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "hd.h"

namespace pyvae {

PYVAE_HD float int_bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

PYVAE_HD int32_t float_to_int_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// Round to nearest integer (ties to even). The host spelling adds and subtracts 1.5 * 2^23, which
// vectorises on the baseline x86-64 ISA (rintf needs SSE4.1); valid for |v| < 2^22.
PYVAE_HD float round_nearest(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
#endif
}

// 2^k for k in [-126, 127].
PYVAE_HD float pow2i(int32_t k) { return int_bits_to_float((k + 127) << 23); }

// e^r for |r| <= ln(2)/2.
PYVAE_HD float exp_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// ln 2 in two parts: kLn2High has 9 significant bits, so k * kLn2High is exact for any integer |k| < 2^15.
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
constexpr float kLog2e = 1.44269504088896341f;

// e^x with IEEE special cases: +inf -> +inf, -inf -> 0, NaN -> NaN, overflow -> +inf.
PYVAE_HD float exp_f(float x) {
  float xc = x < -104.0f ? -104.0f : x;  // NaN passes through the clamps and is restored below
  xc = xc > 88.8f ? 88.8f : xc;
  const float k = round_nearest(xc * kLog2e);
  const float y = exp_reduced(xc - k * kLn2High - k * kLn2Low);
  // Scale in two halves so 2^k stays a normal float over the whole clamped range.
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k_half = ki / 2;
  float result = y * pow2i(k_half) * pow2i(ki - k_half);
  result = x > 88.72283935546875f ? INFINITY : result;
  result = x < -103.97208f ? 0.0f : result;
  return x != x ? x : result;
}

// e^x for x in [-87, 87] (NaN -> NaN): exp_f without its clamps and special cases (2^k is then
// one normal float, and scaling by it rounds as exp_f's two halves do). Equal to exp_f bit for bit
// over that whole range where the compiler fuses no products into FMAs; where it does, it may fuse
// the two differently, and about 1 value in 10^4 differs by 1 ulp (checked exhaustively with
// g++ 12 -march=native). Out of that range the result is wrong: callers clamp x first.
PYVAE_HD float exp_normal(float x) {
  const float k = round_nearest((x < 87.0f ? x : 87.0f) * kLog2e);  // NaN: k = 126, defined; y is NaN
  return exp_reduced(x - k * kLn2High - k * kLn2Low) * pow2i(static_cast<int32_t>(k));
}

// e^-a for a >= 0 (+inf -> 0, NaN -> NaN): exp_f's shorter sibling for the Bernoulli losses, which
// are bound by the latency of this and log1p_unit on the CPU. Results below the smallest normal
// float (a > -ln(FLT_MIN) = 87.33654) are flushed to 0, so one power of two scales every result.
PYVAE_HD float exp_neg(float a) {
  constexpr float kMaxA = 87.33654f;
  const float ac = a <= kMaxA ? a : kMaxA;  // NaN too, so that k converts to an integer defined
  const float k = round_nearest(ac * kLog2e);
  const float y = exp_reduced(k * kLn2High - ac + k * kLn2Low);
  const float result = y * pow2i(-static_cast<int32_t>(k));
  return a <= kMaxA ? result : (a > kMaxA ? 0.0f : a);
}

// log(1 + f) + e ln 2 for f in [sqrt(1/2) - 1, sqrt(2) - 1].
PYVAE_HD float log_reduced(float f, float e) {
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + kLn2Low * e;
  y = y - 0.5f * z;
  return f + y + kLn2High * e;
}

// Natural log of a positive, finite, normal float (the Box-Muller argument lies in [1e-7, 1)).
PYVAE_HD float log_unit(float x) {
  const int32_t bits = float_to_int_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  float m = int_bits_to_float((bits & 0x007fffff) | 0x3f800000);  // m in [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1.0f : e;
  return log_reduced(m - 1.0f, e);
}

// log(1 + x) for x in [0, 1] (NaN -> NaN), without forming 1 + x: below sqrt(2) - 1, x is the
// reduced argument itself; above, (1 + x) / 2 = 1 + (x - 1) / 2 with x - 1 exact or nearly so.
PYVAE_HD float log1p_unit(float x) {
  const bool high = x > 0.41421356f;
  return log_reduced(high ? 0.5f * (x - 1.0f) : x, high ? 1.0f : 0.0f);
}

// Natural log of a positive normal float, +inf and NaN passing through as in logf. (Kept apart
// from log_unit: the extra select stops g++ vectorising the Box-Muller loop.)
PYVAE_HD float log_f(float x) {
  const float result = log_unit(x);
  return (x == INFINITY) | (x != x) ? x : result;
}

// log(1 + x) for x in (-1, 1], accurate for small |x|: log(u) corrected by the rounding of u = 1 + x.
PYVAE_HD float log1p_f(float x) {
  const float u = 1.0f + x;
  const float correction = u == 1.0f ? 0.0f : (x - (u - 1.0f)) / u;
  return (u == 1.0f ? x : log_unit(u)) + correction;
}

// sin(2 pi u) and cos(2 pi u). The quadrant is taken from u itself (exactly), so the reduced
// angle carries no error from rounding 2 pi u.
PYVAE_HD void sincos_2pi(float u, float& s, float& c) {
  const float q = round_nearest(4.0f * u);
  const float a = (u - 0.25f * q) * 6.28318530717958647692f;  // |a| <= pi/4
  const float z = a * a;
  const float sin_a = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const float cos_a =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
      0.5f * z + 1.0f;
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  const bool swap = quadrant & 1;
  const float s_abs = swap ? cos_a : sin_a;
  const float c_abs = swap ? sin_a : cos_a;
  s = (quadrant & 2) ? -s_abs : s_abs;
  c = ((quadrant + 1) & 2) ? -c_abs : c_abs;
}

}  // namespace pyvae
