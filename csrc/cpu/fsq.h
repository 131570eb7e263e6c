#pragma once
#include "../common/fsq_params.h"

namespace pyvae::cpu {
void fsq_forward(const FsqForwardParams& p);
void fsq_backward(const FsqBackwardParams& p);
}  // namespace pyvae::cpu
