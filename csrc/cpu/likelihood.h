#pragma once
#include "../common/likelihood_params.h"

namespace pyvae::cpu {
void likelihood_forward(const LikelihoodForwardParams& p);
void likelihood_backward(const LikelihoodBackwardParams& p);
}  // namespace pyvae::cpu
