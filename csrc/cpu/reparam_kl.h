#pragma once
#include "../common/reparam_kl_params.h"

namespace pyvae::cpu {
void reparam_kl_forward(const ReparamKLForwardParams& p);
void reparam_kl_backward(const ReparamKLBackwardParams& p);
}  // namespace pyvae::cpu
