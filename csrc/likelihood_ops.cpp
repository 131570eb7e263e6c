// The likelihood op family: schemas of torch.ops.pyvae.likelihood_forward (the Bernoulli, Gaussian
// and continuous-Bernoulli negative log-likelihoods and, in the same pass, their derivatives) and
// scale_grad_ (its backward), and their CPU and CUDA implementations.
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/likelihood_params.h"
#include "cpu/likelihood.h"
#include "ops_common.h"
#ifdef PYVAE_WITH_CUDA
#include "cuda/likelihood.h"
#endif

namespace pyvae {
namespace {

Loss parse_loss(const std::string& name) {
  if (name == "bernoulli") return Loss::kBernoulli;
  if (name == "gaussian") return Loss::kGaussian;
  if (name == "continuous_bernoulli") return Loss::kContinuousBernoulli;
  TORCH_CHECK_VALUE(false, "loss must be 'bernoulli', 'gaussian' or 'continuous_bernoulli', got '", name, "'");
}

struct LikelihoodChecked {
  at::Tensor pred, target, logvar;  // the [rows, cols] (logvar [1 or rows, cols], float32) views
  LikelihoodInputs kernel;
  bool logvar_shared_by_batch = false;  // by shape (== kernels/_layout.logvar_shared_by_batch)
};

LikelihoodChecked check_likelihood(const std::string& loss, const at::Tensor& pred, const at::Tensor& target,
                                   const std::optional<at::Tensor>& logvar, double fixed_logvar, double constant) {
  TORCH_CHECK_VALUE(pred.dim() >= 1, "the prediction must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(pred.sizes() == target.sizes(), "prediction and target must have the same shape, got ",
                    pred.sizes(), " and ", target.sizes());
  TORCH_CHECK_VALUE(pred.device() == target.device(), "prediction and target must be on the same device");
  const int64_t rows = pred.size(0);
  const int64_t cols = c10::multiply_integers(pred.sizes().slice(1));
  LikelihoodChecked c{as_rows(pred, rows, cols), as_rows(target, rows, cols), {}, {}};
  c.kernel = LikelihoodInputs{parse_loss(loss), kernel_dtype(pred, "prediction"), kernel_dtype(target, "target"),
                              c.pred.data_ptr(), c.target.data_ptr(), c.pred.stride(0), c.target.stride(0), rows, cols,
                              nullptr, 0, static_cast<float>(fixed_logvar), static_cast<float>(constant)};
  if (logvar.has_value()) {
    TORCH_CHECK_VALUE(logvar->device() == pred.device(), "logvar must be on the device of the prediction");
    TORCH_CHECK_VALUE(at::is_expandable_to(logvar->sizes(), pred.sizes()), "logvar of shape ", logvar->sizes(),
                      " does not broadcast to the prediction's shape ", pred.sizes());
    if (rows == 0) return c;  // nothing to read; the gradient is [0, ...] either way
    const at::Tensor full = logvar->to(at::kFloat).expand(pred.sizes());
    // Whether the gradient is summed over row groups is decided by shape, as the fake kernel and
    // the Triton launcher do: an expanded view of a [B, ...] tensor gets a per-element gradient. It
    // is still read as one row (stride 0), without a copy.
    c.logvar_shared_by_batch = rows == 1 || logvar->dim() < pred.dim() || logvar->size(0) == 1;
    const bool one_row = full.stride(0) == 0 || rows == 1;
    c.logvar = one_row ? full.select(0, 0).contiguous().reshape({1, cols}) : full.contiguous().reshape({rows, cols});
    c.kernel.logvar = c.logvar.data_ptr<float>();
    c.kernel.logvar_row_stride = one_row ? 0 : cols;
  }
  return c;
}

void run_likelihood(const LikelihoodParams& p, const at::Device& device) {
  if (p.in.rows == 0 || p.in.cols == 0) return;
#ifdef PYVAE_WITH_CUDA
  if (device.is_cuda()) {
    cuda::likelihood(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  cpu::likelihood(p);
}

struct LikelihoodGrads {
  at::Tensor pred, target, logvar;  // empty (numel 0) when not asked for: the schema has no optional outputs
};

// Allocates the asked-for gradients and points the kernel at them. The log-variance's is
// [row groups, *pred.shape[1:]] (see kLogvarGroupRows) when logvar is shared by the batch.
LikelihoodGrads allocate_grads(const at::Tensor& pred, const at::Tensor& target, bool pred_grad, bool target_grad,
                               bool logvar_grad, LikelihoodParams& p) {
  std::vector<int64_t> logvar_grad_shape{0};
  if (logvar_grad) {
    logvar_grad_shape = pred.sizes().vec();
    logvar_grad_shape[0] = row_groups(pred.size(0), p.logvar_group_rows);
  }
  LikelihoodGrads g{pred_grad ? new_output(pred.sizes(), pred.options()) : at::empty({0}, pred.options()),
                    target_grad ? new_output(target.sizes(), target.options()) : at::empty({0}, target.options()),
                    new_output(logvar_grad_shape, pred.options().dtype(at::kFloat))};
  p.grad_pred = pred_grad ? g.pred.data_ptr() : nullptr;
  p.grad_target = target_grad ? g.target.data_ptr() : nullptr;
  p.grad_logvar = logvar_grad ? g.logvar.data_ptr<float>() : nullptr;
  return g;
}

// The losses (float32: per element in the prediction's shape, or per sample [B], the kernels'
// per-column-block partial sums added in block order) and the asked-for per-element derivatives.
using LikelihoodForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One implementation for the CPU and CUDA keys: only the kernel launch depends on the device.
LikelihoodForwardResult likelihood_forward(const std::string& loss, const at::Tensor& pred, const at::Tensor& target,
                                           const std::optional<at::Tensor>& logvar, double fixed_logvar,
                                           double constant, bool per_element, bool pred_grad, bool target_grad,
                                           bool logvar_grad, double grad_scale, bool group_logvar_grad) {
  LikelihoodChecked c = check_likelihood(loss, pred, target, logvar, fixed_logvar, constant);
  c10::OptionalDeviceGuard guard;  // after the checks: the inputs' devices are known to agree
  if (pred.is_cuda()) guard.reset_device(pred.device());
  const int64_t rows = c.kernel.rows, cols = c.kernel.cols;
  at::Tensor out = per_element ? new_output(pred.sizes(), pred.options().dtype(at::kFloat))
                               : at::empty({rows, column_blocks(cols)}, pred.options().dtype(at::kFloat));
  LikelihoodParams p{};
  p.in = c.kernel;
  p.loss = out.data_ptr<float>();
  p.per_element = per_element;
  p.grad_scale = static_cast<float>(grad_scale);
  p.logvar_group_rows =
      group_logvar_grad && c.kernel.logvar != nullptr && c.logvar_shared_by_batch ? kLogvarGroupRows : 1;
  LikelihoodGrads g = allocate_grads(pred, target, pred_grad, target_grad, logvar_grad && logvar.has_value(), p);
  run_likelihood(p, pred.device());
  if (!per_element) {
    out = cols == 0 ? at::zeros({rows}, pred.options().dtype(at::kFloat))
                    : out.size(1) == 1 ? out.view({rows}) : out.sum(1);
  }
  return {out, g.pred, g.target, g.logvar};
}

void check_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  kernel_dtype(grad, "grad");
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad must be contiguous");
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.scalar_type() == at::kFloat,
                    "scale must be a single float32 value, got ", scale.scalar_type(), " of shape ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == grad.device(), "scale must be on the device of grad");
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad(grad, scale);
  if (scale.item<float>() != 1.0f) grad.mul_(scale.reshape({}));
}

#ifdef PYVAE_WITH_CUDA
void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  cuda::scale_unless_one(grad.data_ptr(), kernel_dtype(grad, "grad"), grad.numel(), scale.data_ptr<float>(),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  // Negative log-likelihood terms of loss "bernoulli" | "gaussian" | "continuous_bernoulli" for
  // prediction/target [B, ...]: float32 per element (per_element) or per sample [B]. logvar
  // (Gaussian) broadcasts to the prediction; without it every element uses fixed_logvar; constant
  // is added per element (0.5 log 2 pi for the full Gaussian). In the same pass, the derivatives
  // of each element's loss with respect to pred / target / logvar, where asked (else empty):
  // backward then only scales them. Every derivative is multiplied by grad_scale (the reduction's
  // factor, 1/B for "batchmean"). grad_logvar is float32 in the prediction's shape (not yet
  // reduced to logvar's), except that with group_logvar_grad and a logvar shared by the batch (size 1
  // or absent in dim 0) its dim 0 holds ceil(B / 16) sums over consecutive groups of 16 rows (for an
  // upstream gradient that is the same for every row: a scalar loss).
  m.def("likelihood_forward(str loss, Tensor pred, Tensor target, Tensor? logvar, float fixed_logvar, "
        "float constant, bool per_element, bool pred_grad, bool target_grad, bool logvar_grad, float grad_scale, "
        "bool group_logvar_grad) "
        "-> (Tensor loss, Tensor grad_pred, Tensor grad_target, Tensor grad_logvar)");
  // grad (contiguous, float32/float16/bfloat16) *= scale (one float32 value on grad's device),
  // skipped when scale is 1, without a host synchronisation on CUDA (the kernel reads the scale).
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("likelihood_forward", &pyvae::likelihood_forward);
  m.impl("scale_grad_", &pyvae::scale_grad_cpu);
}

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("likelihood_forward", &pyvae::likelihood_forward);
  m.impl("scale_grad_", &pyvae::scale_grad_cuda);
}
#endif
