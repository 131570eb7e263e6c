#pragma once
#include "../common/dmol_params.h"

namespace pyvae::cpu {
void dmol(const DmolParams& p);
void dmol_sample(const DmolSampleParams& p);
}  // namespace pyvae::cpu
