// The finite scalar quantization op family: schemas of torch.ops.pyvae.fsq_forward (codes and
// indices in one pass) and fsq_backward (the straight-through gradient in one pass) and their CPU and
// CUDA implementations. The checks are those of kernels/contracts/fsq.py, word for word.
#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <vector>

#include "common/fsq_params.h"
#include "cpu/fsq.h"
#include "ops_common.h"
#ifdef PYVAE_WITH_CUDA
#include "cuda/fsq.h"
#endif

namespace pyvae {
namespace {

constexpr int64_t kFsqMaxCodebook = int64_t{1} << 31;  // indices are int32

void check_levels(at::IntArrayRef levels, bool preserve_symmetry) {
  TORCH_CHECK_VALUE(!levels.empty(), "levels must not be empty");
  bool at_least_2 = true, has_2 = false;
  int64_t product = 1;  // stops growing past kFsqMaxCodebook: no overflow
  for (const int64_t level : levels) {
    at_least_2 = at_least_2 && level >= 2;
    has_2 = has_2 || level == 2;
    if (level >= 2) product = std::min(product * std::min(level, kFsqMaxCodebook), kFsqMaxCodebook);
  }
  TORCH_CHECK_VALUE(at_least_2, "levels must each be >= 2, got ", levels);
  TORCH_CHECK_VALUE(preserve_symmetry || !has_2, "levels of 2 need preserve_symmetry=True, got ", levels);
  TORCH_CHECK_VALUE(product < kFsqMaxCodebook, "levels must multiply to less than 2^31 (indices are int32), got ",
                    levels);
}

void check_z(const at::Tensor& z, at::IntArrayRef levels) {
  const int64_t dims = static_cast<int64_t>(levels.size());
  TORCH_CHECK_VALUE(z.dim() >= 1 && z.size(-1) == dims, "z must have len(levels) = ", dims,
                    " values in its last dim, got shape ", z.sizes());
  kernel_dtype(z, "z");
}

// z's rows: the number of vectors of len(levels) values.
int64_t rows_of(const at::Tensor& z) { return c10::multiply_integers(z.sizes().slice(0, z.dim() - 1)); }

using FsqForwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;

// One implementation for the CPU and CUDA keys: only the kernel launch depends on the device.
FsqForwardResult fsq_forward(const at::Tensor& z_in, at::IntArrayRef levels, bool preserve_symmetry,
                             bool want_indices) {
  check_levels(levels, preserve_symmetry);
  check_z(z_in, levels);
  c10::OptionalDeviceGuard guard;
  if (z_in.is_cuda()) guard.reset_device(z_in.device());
  const int64_t dims = static_cast<int64_t>(levels.size()), rows = rows_of(z_in);
  const at::Tensor z = as_rows(z_in, rows, dims);
  at::Tensor codes = new_output(z_in.sizes(), z_in.options());
  std::vector<at::Tensor> indices;
  if (want_indices) indices.push_back(at::empty(z_in.sizes().slice(0, z_in.dim() - 1), z_in.options().dtype(at::kInt)));
  if (rows == 0) return {codes, std::move(indices)};
  FsqForwardParams p{};
  p.dtype = kernel_dtype(z, "z");
  p.z = z.data_ptr();
  p.rows = rows;
  p.z_row_stride = z.stride(0);
  p.codes = codes.data_ptr();
  p.indices = want_indices ? indices[0].data_ptr<int32_t>() : nullptr;
  p.levels = fsq_levels(levels.data(), dims, preserve_symmetry);
#ifdef PYVAE_WITH_CUDA
  if (z.is_cuda()) {
    cuda::fsq_forward(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {codes, std::move(indices)};
  }
#endif
  cpu::fsq_forward(p);
  return {codes, std::move(indices)};
}

at::Tensor fsq_backward(const at::Tensor& z_in, const at::Tensor& grad_codes_in, at::IntArrayRef levels,
                        bool preserve_symmetry) {
  check_levels(levels, preserve_symmetry);
  check_z(z_in, levels);
  TORCH_CHECK_VALUE(grad_codes_in.sizes() == z_in.sizes(), "grad_codes must have z's shape ", z_in.sizes(), ", got ",
                    grad_codes_in.sizes());
  TORCH_CHECK_TYPE(grad_codes_in.scalar_type() == z_in.scalar_type(), "grad_codes must have z's dtype (",
                   z_in.scalar_type(), "), got ", grad_codes_in.scalar_type());
  PYVAE_CHECK_DEVICE_OF(grad_codes_in, "grad_codes", z_in, "z");
  c10::OptionalDeviceGuard guard;
  if (z_in.is_cuda()) guard.reset_device(z_in.device());
  const int64_t dims = static_cast<int64_t>(levels.size()), rows = rows_of(z_in);
  const at::Tensor z = as_rows(z_in, rows, dims), grad_codes = as_rows(grad_codes_in, rows, dims);
  at::Tensor grad_z = new_output(z_in.sizes(), z_in.options());
  if (rows == 0) return grad_z;
  FsqBackwardParams p{};
  p.dtype = kernel_dtype(z, "z");
  p.z = z.data_ptr();
  p.grad_codes = grad_codes.data_ptr();
  p.rows = rows;
  p.z_row_stride = z.stride(0);
  p.grad_codes_row_stride = grad_codes.stride(0);
  p.grad_z = grad_z.data_ptr();
  p.levels = fsq_levels(levels.data(), dims, preserve_symmetry);
#ifdef PYVAE_WITH_CUDA
  if (z.is_cuda()) {
    cuda::fsq_backward(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return grad_z;
  }
#endif
  cpu::fsq_backward(p);
  return grad_z;
}

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  // Finite scalar quantization of z [..., d] with d = len(levels) (vector-quantize-pytorch's FSQ):
  // each value bounded by tanh and rounded to one of its dimension's levels (preserve_symmetry: the
  // symmetric bound). The codes in [-1, 1] (z's shape and dtype) and, with want_indices, each row's
  // index into the implicit codebook (int32, z's shape without its last dim; -1 for a row with a
  // NaN). The formulas: pyvae/ops/fsq.py.
  m.def("fsq_forward(Tensor z, int[] levels, bool preserve_symmetry, bool want_indices) "
        "-> (Tensor codes, Tensor[] indices)");
  // The straight-through gradient to z of the codes (the bound's slope; the rounding passes it
  // through), from z and grad_codes (z's shape and dtype) in one pass.
  m.def("fsq_backward(Tensor z, Tensor grad_codes, int[] levels, bool preserve_symmetry) -> Tensor grad_z");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("fsq_forward", &pyvae::fsq_forward);
  m.impl("fsq_backward", &pyvae::fsq_backward);
}

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("fsq_forward", &pyvae::fsq_forward);
  m.impl("fsq_backward", &pyvae::fsq_backward);
}
#endif
