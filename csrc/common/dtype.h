// The element types the kernels read and write, as the torch-free CPU and CUDA code names them
// (the binding files map at::ScalarType to it: ops_common.h kernel_dtype).
#pragma once

namespace pyvae {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace pyvae
