// The nearest-code rule shared by the CPU and CUDA searches (kernels/vq.py and the torch reference
// in pyvae/ops/vq.py follow the same rule).
#pragma once
#include <math.h>

#include "hd.h"

namespace pyvae {

// Whether an expanded distance d = |e|^2 - 2 x.e takes over from the running best: strictly
// smaller (codes come in increasing order, so ties keep the lower code) and finite. NaN, and the
// -inf that an infinite value in x or in a code produces, never win: a row with no finite distance
// keeps code 0, and its distance |x|^2 + inf is inf (NaN if x has a NaN).
PYVAE_HD bool beats_best(float d, float best) { return d < best && d > -INFINITY; }

}  // namespace pyvae
