// What the binding files of every op family (csrc/<family>_ops.cpp) share at the boundary between
// PyTorch and the torch-free kernels in cpu/ and cuda/: dtype mapping, the [rows, cols] view the
// kernels expect, output allocation, argument checks, and the CUDA headers a launch needs.
//
// A binding file declares its ops with TORCH_LIBRARY_FRAGMENT(pyvae, m) (the namespace itself is
// defined once, in module.cpp) and registers its kernels with TORCH_LIBRARY_IMPL(pyvae, CPU|CUDA, m).
// The Python API (pyvae/ops) checks arguments first and raises ValueError/TypeError naming them; the
// checks here guard direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "common/dtype.h"
#include "cpu/buffer_cache.h"
#ifdef PYVAE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pyvae {

// The kernel dtype of t; a TypeError naming the argument for any other dtype.
inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// `t` as [rows, cols] with unit column stride: a view where the strides allow, else a copy.
inline at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  at::Tensor rows_view = t.reshape({rows, cols});
  return rows_view.stride(1) == 1 || cols == 1 ? rows_view : rows_view.contiguous();
}

// A large output of an op: on the CPU from the buffer cache (cpu/buffer_cache.h), which spares a
// training loop re-faulting the pages of every call's outputs; elsewhere the device's allocator.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::empty_cached(sizes, options) : at::empty(sizes, options);
}

}  // namespace pyvae

// `t` (an argument named `name`) must be on the device of `ref` (the argument `ref_name`): a
// ValueError "<name> must be on the device of <ref_name> (<ref's device>), got <t's device>".
#define PYVAE_CHECK_DEVICE_OF(t, name, ref, ref_name)                                              \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), name, " must be on the device of " ref_name " (", \
                    (ref).device(), "), got ", (t).device())
