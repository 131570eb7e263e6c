// The residual vector quantisation op family: the schema of torch.ops.pyvae.residual_code (Q
// nearest-code searches in sequence, each on what the stages before it left, in one call) and its
// CPU and CUDA implementations. The checks are those of kernels/contracts/rvq.py, word for word.
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>
#include <vector>

#include "common/rvq_params.h"
#include "cpu/rvq.h"
#include "ops_common.h"
#ifdef PYVAE_WITH_CUDA
#include "cuda/rvq.h"
#endif

namespace pyvae {
namespace {

void check_residual_code(const at::Tensor& x, const at::Tensor& codebooks) {
  TORCH_CHECK_VALUE(codebooks.dim() == 3, "codebooks must be 3-D [Q, K, D], got shape ", codebooks.sizes());
  TORCH_CHECK_VALUE(codebooks.size(0) > 0, "codebooks must have at least one stage (Q = 0)");
  TORCH_CHECK_VALUE(codebooks.size(1) > 0, "codebooks must have at least one code (K = 0)");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == codebooks.size(2), "x must be [..., D] with D = ",
                    codebooks.size(2), " (the codebooks'), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == codebooks.device(), "x and codebooks must be on the same device");
  kernel_dtype(x, "x");
  kernel_dtype(codebooks, "codebooks");
}

using ResidualCodeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// One implementation for the CPU and CUDA keys: only the kernel launch depends on the device.
ResidualCodeResult residual_code(const at::Tensor& x_in, const at::Tensor& codebooks_in, bool exact) {
  // Called under torch.autocast, the op still has autocast's keys in effect: without this guard the
  // float32 GEMMs of the CPU search would be recast to bfloat16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_residual_code(x_in, codebooks_in);
  c10::OptionalDeviceGuard guard;
  if (x_in.is_cuda()) guard.reset_device(x_in.device());
  const int64_t stages = codebooks_in.size(0), dim = codebooks_in.size(2);
  const int64_t rows = dim ? x_in.numel() / dim : c10::multiply_integers(x_in.sizes().slice(0, x_in.dim() - 1));
  std::vector<int64_t> stage_shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  stage_shape.push_back(stages);
  at::Tensor idx = at::empty(stage_shape, x_in.options().dtype(at::kLong));
  at::Tensor dist = at::empty(stage_shape, x_in.options().dtype(at::kFloat));
  at::Tensor quantized = new_output(x_in.sizes(), x_in.options());
  if (rows == 0) return {idx, dist, quantized};
  const at::Tensor x = as_rows(x_in, rows, dim);
  at::Tensor idx2 = idx.view({rows, stages}), dist2 = dist.view({rows, stages});
  at::Tensor quantized2 = quantized.view({rows, dim});
#ifdef PYVAE_WITH_CUDA
  if (x.is_cuda()) {
    const at::Tensor e = codebooks_in.contiguous();
    const at::Tensor code_sq = e.to(at::kFloat).square().sum(2);
    const ResidualCodeParams p{kernel_dtype(x, "x"), kernel_dtype(e, "codebooks"), x.data_ptr(), e.data_ptr(),
                               x.stride(0), rows, stages, e.size(1), dim, code_sq.data_ptr<float>(),
                               idx2.data_ptr<int64_t>(), dist2.data_ptr<float>(), quantized2.data_ptr(), exact};
    cuda::residual_code(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {idx, dist, quantized};
  }
#endif
  cpu::residual_code(x, codebooks_in, idx2, dist2, quantized2);
  return {idx, dist, quantized};
}

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  // Residual vector quantisation of x [..., D] through codebooks [Q, K, D]: stage q finds the
  // nearest code of codebooks[q] to what stages 0..q-1 left (nearest_code's rule, float32
  // arithmetic). idx (int64 [..., Q]), dist (float32 [..., Q]: each stage's squared distance) and
  // quantized (the chosen codes summed, x's shape and dtype). exact=false allows reduced-precision
  // matrix units where the backend has them.
  m.def("residual_code(Tensor x, Tensor codebooks, bool exact) -> (Tensor idx, Tensor dist, Tensor quantized)");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) { m.impl("residual_code", &pyvae::residual_code); }

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) { m.impl("residual_code", &pyvae::residual_code); }
#endif
