#pragma once
#include "../common/likelihood_params.h"

namespace pyvae::cpu {
void likelihood(const LikelihoodParams& p);
}  // namespace pyvae::cpu
