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
                                   const std::optional<at::Tensor>& logvar, double fixed_logvar, double constant,
                                   int64_t flags) {
  TORCH_CHECK_VALUE(pred.dim() >= 1, "the prediction must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(pred.sizes() == target.sizes(), "prediction and target must have the same shape, got ",
                    pred.sizes(), " and ", target.sizes());
  TORCH_CHECK_VALUE(pred.device() == target.device(), "prediction and target must be on the same device");
  TORCH_CHECK_VALUE((flags & ~likelihood_flags::kAll) == 0, "flags must be a combination of the likelihood flags (",
                    likelihood_flags::kAll, " all set), got ", flags);
  TORCH_CHECK_VALUE(!(flags & likelihood_flags::kGradLogvar) || logvar.has_value(),
                    "flags ask for the log-variance's gradient, but logvar is None");
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

// Allocates the derivatives that `flags` ask for, in the order prediction, target, log-variance, and
// points the kernel at them. The log-variance's is [row groups, *pred.shape[1:]] (see
// kLogvarGroupRows) when p.logvar_group_rows > 1.
std::vector<at::Tensor> allocate_grads(const at::Tensor& pred, const at::Tensor& target, int64_t flags,
                                       LikelihoodParams& p) {
  std::vector<at::Tensor> grads;
  if (flags & likelihood_flags::kGradPred) {
    grads.push_back(new_output(pred.sizes(), pred.options()));
    p.grad_pred = grads.back().data_ptr();
  }
  if (flags & likelihood_flags::kGradTarget) {
    grads.push_back(new_output(target.sizes(), target.options()));
    p.grad_target = grads.back().data_ptr();
  }
  if (flags & likelihood_flags::kGradLogvar) {
    std::vector<int64_t> shape = pred.sizes().vec();
    shape[0] = row_groups(pred.size(0), p.logvar_group_rows);
    grads.push_back(new_output(shape, pred.options().dtype(at::kFloat)));
    p.grad_logvar = grads.back().data_ptr<float>();
  }
  return grads;
}

// The losses (float32: per element in the prediction's shape, or per sample [B], the kernels'
// per-column-block partial sums added in block order) and the derivatives `flags` ask for.
using LikelihoodForwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;

// One implementation for the CPU and CUDA keys: only the kernel launch depends on the device.
LikelihoodForwardResult likelihood_forward(const std::string& loss, const at::Tensor& pred, const at::Tensor& target,
                                           const std::optional<at::Tensor>& logvar, double fixed_logvar,
                                           double constant, int64_t flags, double grad_scale) {
  LikelihoodChecked c = check_likelihood(loss, pred, target, logvar, fixed_logvar, constant, flags);
  c10::OptionalDeviceGuard guard;  // after the checks: the inputs' devices are known to agree
  if (pred.is_cuda()) guard.reset_device(pred.device());
  const int64_t rows = c.kernel.rows, cols = c.kernel.cols;
  const bool per_element = flags & likelihood_flags::kPerElement;
  at::Tensor out = per_element ? new_output(pred.sizes(), pred.options().dtype(at::kFloat))
                               : at::empty({rows, column_blocks(cols)}, pred.options().dtype(at::kFloat));
  LikelihoodParams p{};
  p.in = c.kernel;
  p.loss = out.data_ptr<float>();
  p.per_element = per_element;
  p.grad_scale = static_cast<float>(grad_scale);
  const bool group = (flags & likelihood_flags::kGroupLogvarGrad) && c.kernel.logvar != nullptr;
  p.logvar_group_rows = group && c.logvar_shared_by_batch ? kLogvarGroupRows : 1;
  std::vector<at::Tensor> grads = allocate_grads(pred, target, flags, p);
  run_likelihood(p, pred.device());
  if (!per_element) {
    out = cols == 0 ? at::zeros({rows}, pred.options().dtype(at::kFloat))
                    : out.size(1) == 1 ? out.view({rows}) : out.sum(1);
  }
  return {out, std::move(grads)};
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
  // prediction/target [B, ...]: float32 per sample [B], or per element with the flag PER_ELEMENT.
  // logvar (Gaussian) broadcasts to the prediction; without it every element uses fixed_logvar;
  // constant is added per element (0.5 log 2 pi for the full Gaussian). In the same pass, the
  // derivatives of each element's loss that `flags` ask for (GRAD_PRED, GRAD_TARGET, GRAD_LOGVAR:
  // `grads` holds them in that order), each multiplied by grad_scale (the reduction's factor, 1/B
  // for "batchmean"): backward then only scales them. The log-variance's is float32 in the
  // prediction's shape (not yet reduced to logvar's), except that with GROUP_LOGVAR_GRAD and a
  // logvar shared by the batch (size 1 or absent in dim 0) its dim 0 holds ceil(B / G) sums over
  // consecutive groups of G = kLogvarGroupRows rows (for an upstream gradient that is the same for
  // every row: a scalar loss). The flags and G: likelihood_params.h, pyvae._C.shared_constants().
  m.def("likelihood_forward(str loss, Tensor pred, Tensor target, Tensor? logvar, float fixed_logvar, "
        "float constant, int flags, float grad_scale) -> (Tensor loss, Tensor[] grads)");
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
