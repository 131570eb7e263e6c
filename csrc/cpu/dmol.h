#pragma once
#include "../common/dmol_params.h"

namespace pyvae::cpu {
void dmol(const DmolParams& p);
}  // namespace pyvae::cpu
