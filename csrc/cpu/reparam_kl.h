#pragma once
#include "../common/reparam_kl_params.h"

namespace pyvae::cpu {
void reparam_kl_forward(const ReparamKLForwardParams& p, const ReparamKLPrior& prior);
void reparam_kl_backward(const ReparamKLBackwardParams& p, const ReparamKLPrior& prior,
                         const ReparamKLPriorGrads& prior_grads);
}  // namespace pyvae::cpu
