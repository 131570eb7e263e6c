// Operator schemas of the pyvae namespace and their CPU / CUDA implementations: the boundary where
// tensors are checked, viewed as the [rows, cols] layout the kernels expect, allocated, and handed
// to the torch-free kernels in cpu/ and cuda/. The Python API (pyvae/ops) checks arguments first
// and raises ValueError/TypeError naming them; the checks here guard direct torch.ops calls.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <string>

#include "common/likelihood_params.h"
#include "common/reparam_kl_params.h"
#include "common/vq_params.h"
#include "cpu/buffer_cache.h"
#include "cpu/likelihood.h"
#include "cpu/reparam_kl.h"
#include "cpu/vq.h"
#ifdef PYVAE_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/likelihood.h"
#include "cuda/reparam_kl.h"
#include "cuda/vq.h"
#endif

namespace pyvae {
namespace {

// A large output of an op: on the CPU from the buffer cache (cpu/buffer_cache.h), which spares a
// training loop re-faulting the pages of every call's outputs; elsewhere the device's allocator.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::empty_cached(sizes, options) : at::empty(sizes, options);
}

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// `t` as [rows, cols] with unit column stride: a view where the strides allow, else a copy.
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t cols) {
  at::Tensor rows_view = t.reshape({rows, cols});
  return rows_view.stride(1) == 1 || cols == 1 ? rows_view : rows_view.contiguous();
}


struct CheckedInputs {
  at::Tensor mu, logvar;  // [rows, cols] views (or copies) that the kernel pointers point into
  ReparamKLInputs kernel;
};

CheckedInputs check_inputs(const at::Tensor& mu, const at::Tensor& logvar) {
  TORCH_CHECK_VALUE(mu.dim() >= 1, "mu must have at least one dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(mu.sizes() == logvar.sizes(), "mu and logvar must have the same shape, got ",
                    mu.sizes(), " and ", logvar.sizes());
  TORCH_CHECK_TYPE(mu.scalar_type() == logvar.scalar_type(), "mu and logvar must have the same dtype, got ",
                   mu.scalar_type(), " and ", logvar.scalar_type());
  kernel_dtype(mu, "mu");
  TORCH_CHECK_VALUE(mu.device() == logvar.device(), "mu and logvar must be on the same device");
  const int64_t cols = mu.size(-1);
  const int64_t rows = c10::multiply_integers(mu.sizes().slice(0, mu.dim() - 1));
  CheckedInputs in{as_rows(mu, rows, cols), as_rows(logvar, rows, cols), {}};
  in.kernel = ReparamKLInputs{kernel_dtype(mu, "mu"), in.mu.data_ptr(), in.logvar.data_ptr(), in.mu.stride(0),
                              in.logvar.stride(0), rows, cols};
  return in;
}

// A prior tensor as the kernels read it: broadcast to mu's shape and viewed as [rows, cols] in place
// (stride 0 along the broadcast dims: a [Z] or [1, Z] prior is one row read by every row), copied
// only where no such view exists (e.g. [A, 1, Z] for an [A, B, Z] mu) or the columns are strided.
at::Tensor prior_rows(const at::Tensor& t, const char* name, const at::Tensor& mu, int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(t.scalar_type() == mu.scalar_type(), name, " must have the dtype of mu (", mu.scalar_type(),
                   "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == mu.device(), name, " must be on the device of mu (", mu.device(), "), got ",
                    t.device());
  TORCH_CHECK_VALUE(at::is_expandable_to(t.sizes(), mu.sizes()), name, " of shape ", t.sizes(),
                    " does not broadcast to mu's shape ", mu.sizes());
  at::Tensor v = t.expand(mu.sizes()).reshape({rows, cols});
  return cols > 1 && v.stride(1) != 0 && v.stride(1) != 1 ? v.contiguous() : v;
}

struct CheckedPrior {
  at::Tensor mu, logvar;  // the [rows, cols] views the kernel pointers point into (undefined if absent)
  ReparamKLPrior kernel;
};

CheckedPrior check_prior(const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
                         const at::Tensor& mu, const CheckedInputs& in) {
  CheckedPrior c{};
  c.kernel.present = prior_mu.has_value() || prior_logvar.has_value();
  const int64_t rows = in.kernel.rows, cols = in.kernel.cols;
  // cols == 1: only column 0 is read, whatever the stride
  const auto col_stride = [&](const at::Tensor& v) -> int64_t { return cols > 1 && v.stride(1) == 0 ? 0 : 1; };
  if (prior_mu.has_value()) {
    c.mu = prior_rows(*prior_mu, "prior_mu", mu, rows, cols);
    c.kernel.mu = c.mu.data_ptr();
    c.kernel.mu_row_stride = c.mu.stride(0);
    c.kernel.mu_col_stride = col_stride(c.mu);
  }
  if (prior_logvar.has_value()) {
    c.logvar = prior_rows(*prior_logvar, "prior_logvar", mu, rows, cols);
    c.kernel.logvar = c.logvar.data_ptr();
    c.kernel.logvar_row_stride = c.logvar.stride(0);
    c.kernel.logvar_col_stride = col_stride(c.logvar);
  }
  return c;
}

void check_seed_value(const std::optional<int64_t>& seed) {
  TORCH_CHECK_VALUE(!seed.has_value() || *seed >= 0, "seed must be in [0, 2**63 - 1], got ", seed.value_or(0));
}

const int64_t* check_seed_tensor(const at::Tensor& seed, const at::Tensor& mu) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "seed must be a one-element int64 tensor (the seed_used output of forward)");
  TORCH_CHECK_VALUE(seed.device() == mu.device(), "seed must be on the device of mu (", mu.device(), "), got ",
                    seed.device());
  return seed.data_ptr<int64_t>();
}

// A key for seed=None on the CPU: the next 63 bits of torch's default CPU generator.
int64_t draw_cpu_key() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64() >> 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward(const at::Tensor& mu, int64_t n_samples,
                                                                 bool kl_per_element) {
  TORCH_CHECK_VALUE(n_samples >= 1, "n_samples must be >= 1, got ", n_samples);
  std::vector<int64_t> z_shape{n_samples};
  z_shape.insert(z_shape.end(), mu.sizes().begin(), mu.sizes().end());
  at::Tensor z = new_output(z_shape, mu.options());
  at::Tensor kl = kl_per_element ? new_output(mu.sizes(), mu.options().dtype(at::kFloat))
                                 : at::empty(mu.sizes().slice(0, mu.dim() - 1), mu.options().dtype(at::kFloat));
  at::Tensor seed_used = at::empty({}, mu.options().dtype(at::kLong));
  return {z, kl, seed_used};
}

ReparamKLForwardParams forward_params(const CheckedInputs& in, int64_t n_samples, bool kl_per_element,
                                      at::Tensor& z, at::Tensor& kl, at::Tensor& seed_used) {
  ReparamKLForwardParams p{};
  p.in = in.kernel;
  p.seed.key_out = seed_used.data_ptr<int64_t>();
  p.samples = n_samples;
  p.z = z.data_ptr();
  p.kl = kl.data_ptr<float>();
  p.kl_per_element = kl_per_element;
  return p;
}

struct BackwardBuffers {
  at::Tensor grad_z, grad_kl, grad_mu, grad_logvar;
  at::Tensor grad_prior_mu, grad_prior_logvar;  // float32 [rows, cols] per element, where asked for
  ReparamKLPriorGrads prior_grads{};            // pointers into them
};

ReparamKLBackwardParams backward_params(const CheckedInputs& in, const at::Tensor& seed,
                                        const std::optional<at::Tensor>& grad_z,
                                        const std::optional<at::Tensor>& grad_kl, const at::Tensor& mu,
                                        BackwardBuffers& buf) {
  ReparamKLBackwardParams p{};
  p.in = in.kernel;
  p.seed = check_seed_tensor(seed, mu);
  p.samples = 0;
  if (grad_z.has_value()) {
    TORCH_CHECK_VALUE(grad_z->dim() == mu.dim() + 1 && grad_z->sizes().slice(1) == mu.sizes(),
                      "grad_z must have shape [n_samples, *mu.shape], got ", grad_z->sizes());
    TORCH_CHECK_TYPE(grad_z->scalar_type() == mu.scalar_type(), "grad_z must have the dtype of mu");
    TORCH_CHECK_VALUE(grad_z->device() == mu.device(), "grad_z must be on the device of mu (", mu.device(),
                      "), got ", grad_z->device());
    buf.grad_z = grad_z->contiguous();
    p.grad_z = buf.grad_z.data_ptr();
    p.samples = grad_z->size(0);
  }
  if (grad_kl.has_value()) {
    TORCH_CHECK_VALUE(grad_kl->sizes() == mu.sizes(),
                      "grad_kl must have the shape of mu (expanded if need be), got ", grad_kl->sizes());
    TORCH_CHECK_TYPE(grad_kl->scalar_type() == at::kFloat, "grad_kl must be float32");
    TORCH_CHECK_VALUE(grad_kl->device() == mu.device(), "grad_kl must be on the device of mu (", mu.device(),
                      "), got ", grad_kl->device());
    buf.grad_kl = grad_kl->reshape({in.kernel.rows, in.kernel.cols});  // a view for expanded per-row/scalar grads
    p.grad_kl = buf.grad_kl.data_ptr<float>();
    p.grad_kl_row_stride = buf.grad_kl.stride(0);
    p.grad_kl_col_stride = buf.grad_kl.stride(1);
  }
  buf.grad_mu = new_output(mu.sizes(), mu.options());
  buf.grad_logvar = new_output(mu.sizes(), mu.options());
  p.grad_mu = buf.grad_mu.data_ptr();
  p.grad_logvar = buf.grad_logvar.data_ptr();
  return p;
}

// Float32 per-element buffers for the prior's gradients asked for (none without grad_kl: they are
// then zero).
void allocate_prior_grads(const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
                          bool prior_mu_grad, bool prior_logvar_grad, const at::Tensor& mu,
                          const ReparamKLBackwardParams& p, BackwardBuffers& buf) {
  TORCH_CHECK_VALUE(!prior_mu_grad || prior_mu.has_value(), "prior_mu_grad needs a prior_mu");
  TORCH_CHECK_VALUE(!prior_logvar_grad || prior_logvar.has_value(), "prior_logvar_grad needs a prior_logvar");
  if (p.grad_kl == nullptr) return;
  const auto options = mu.options().dtype(at::kFloat);
  if (prior_mu_grad) {
    buf.grad_prior_mu = new_output({p.in.rows, p.in.cols}, options);
    buf.prior_grads.mu = buf.grad_prior_mu.data_ptr<float>();
  }
  if (prior_logvar_grad) {
    buf.grad_prior_logvar = new_output({p.in.rows, p.in.cols}, options);
    buf.prior_grads.logvar = buf.grad_prior_logvar.data_ptr<float>();
  }
}

// A prior's gradient in its own shape and dtype: the kernel's per-element float32 values summed over
// the dims where it broadcasts (at::sum_to: a fixed-order reduction), zeros without a KL gradient,
// an empty tensor where not asked for (the schema has no optional outputs).
at::Tensor reduce_prior_grad(const at::Tensor& per_element, const std::optional<at::Tensor>& prior, bool wanted,
                             const at::Tensor& mu) {
  if (!wanted) return at::empty({0}, mu.options());
  if (!per_element.defined()) return at::zeros(prior->sizes(), prior->options());
  return at::sum_to(per_element.view(mu.sizes()), prior->sizes()).to(prior->scalar_type()).contiguous();
}

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardResult backward_result(const BackwardBuffers& buf, const std::optional<at::Tensor>& prior_mu,
                               const std::optional<at::Tensor>& prior_logvar, bool prior_mu_grad,
                               bool prior_logvar_grad, const at::Tensor& mu) {
  return {buf.grad_mu, buf.grad_logvar, reduce_prior_grad(buf.grad_prior_mu, prior_mu, prior_mu_grad, mu),
          reduce_prior_grad(buf.grad_prior_logvar, prior_logvar, prior_logvar_grad, mu)};
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

ForwardResult reparam_kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar, std::optional<int64_t> seed,
                                     int64_t n_samples, bool kl_per_element,
                                     const std::optional<at::Tensor>& prior_mu,
                                     const std::optional<at::Tensor>& prior_logvar) {
  CheckedInputs in = check_inputs(mu, logvar);
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);
  check_seed_value(seed);
  auto [z, kl, seed_used] = allocate_forward(mu, n_samples, kl_per_element);
  ReparamKLForwardParams p = forward_params(in, n_samples, kl_per_element, z, kl, seed_used);
  p.seed.key = seed.has_value() ? *seed : draw_cpu_key();
  *p.seed.key_out = p.seed.key;
  if (in.kernel.cols == 0) kl.zero_();  // an empty sum per row
  if (in.kernel.rows > 0 && in.kernel.cols > 0) cpu::reparam_kl_forward(p, prior.kernel);
  return {z, kl, seed_used};
}

BackwardResult reparam_kl_backward_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                                       const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
                                       const std::optional<at::Tensor>& prior_mu,
                                       const std::optional<at::Tensor>& prior_logvar, bool prior_mu_grad,
                                       bool prior_logvar_grad) {
  CheckedInputs in = check_inputs(mu, logvar);
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);
  BackwardBuffers buf;
  ReparamKLBackwardParams p = backward_params(in, seed, grad_z, grad_kl, mu, buf);
  allocate_prior_grads(prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu, p, buf);
  if (in.kernel.rows > 0 && in.kernel.cols > 0) cpu::reparam_kl_backward(p, prior.kernel, buf.prior_grads);
  return backward_result(buf, prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu);
}

#ifdef PYVAE_WITH_CUDA
ForwardResult reparam_kl_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar, std::optional<int64_t> seed,
                                      int64_t n_samples, bool kl_per_element,
                                      const std::optional<at::Tensor>& prior_mu,
                                      const std::optional<at::Tensor>& prior_logvar) {
  CheckedInputs in = check_inputs(mu, logvar);
  check_seed_value(seed);
  const c10::cuda::CUDAGuard guard(mu.device());
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);
  auto [z, kl, seed_used] = allocate_forward(mu, n_samples, kl_per_element);
  ReparamKLForwardParams p = forward_params(in, n_samples, kl_per_element, z, kl, seed_used);
  if (seed.has_value()) {
    p.seed.key = *seed;
  } else {
    // The generator's (seed, offset) is read by the kernel itself, so drawing costs no launch and
    // no host sync, and a captured graph gets a fresh offset on every replay (as dropout does).
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(mu.device().index()));
    at::PhiloxCudaState state;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      state = gen->philox_cuda_state(4);
    }
    p.seed.from_cuda_generator = true;
    p.seed.captured = state.captured_;
    if (state.captured_) {
      p.seed.generator_seed_ptr = state.seed_.ptr;
      p.seed.generator_offset_ptr = state.offset_.ptr;
      p.seed.offset_intragraph = state.offset_intragraph_;
    } else {
      p.seed.generator_seed = state.seed_.val;
      p.seed.generator_offset = state.offset_.val;
    }
  }
  if (in.kernel.cols == 0) kl.zero_();
  if (in.kernel.rows == 0 || in.kernel.cols == 0) {
    // nothing to draw: an empty backward takes any key; a given seed is recorded as on the CPU
    seed_used.fill_(seed.value_or(0));
  } else {
    cuda::reparam_kl_forward(p, prior.kernel, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {z, kl, seed_used};
}

BackwardResult reparam_kl_backward_cuda(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                                        const std::optional<at::Tensor>& grad_z,
                                        const std::optional<at::Tensor>& grad_kl,
                                        const std::optional<at::Tensor>& prior_mu,
                                        const std::optional<at::Tensor>& prior_logvar, bool prior_mu_grad,
                                        bool prior_logvar_grad) {
  CheckedInputs in = check_inputs(mu, logvar);
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);  // checks the priors' devices
  BackwardBuffers buf;
  ReparamKLBackwardParams p = backward_params(in, seed, grad_z, grad_kl, mu, buf);  // checks every device
  const c10::cuda::CUDAGuard guard(mu.device());
  allocate_prior_grads(prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu, p, buf);
  cuda::reparam_kl_backward(p, prior.kernel, buf.prior_grads, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return backward_result(buf, prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu);
}
#endif

// ------------------------------------------------------------------------------------ likelihoods

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

void run_likelihood(const LikelihoodParams& p, bool cuda) {
  if (p.in.rows == 0 || p.in.cols == 0) return;
#ifdef PYVAE_WITH_CUDA
  if (cuda) {
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

LikelihoodForwardResult likelihood_forward_impl(const std::string& loss, const at::Tensor& pred,
                                                const at::Tensor& target, const std::optional<at::Tensor>& logvar,
                                                double fixed_logvar, double constant, bool per_element,
                                                bool pred_grad, bool target_grad, bool logvar_grad,
                                                double grad_scale, bool group_logvar_grad, bool cuda) {
  LikelihoodChecked c = check_likelihood(loss, pred, target, logvar, fixed_logvar, constant);
#ifdef PYVAE_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;  // after the checks: the inputs' devices are known to agree
  if (cuda) guard.emplace(pred.device());
#endif
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
  run_likelihood(p, cuda);
  if (!per_element) {
    out = cols == 0 ? at::zeros({rows}, pred.options().dtype(at::kFloat))
                    : out.size(1) == 1 ? out.view({rows}) : out.sum(1);
  }
  return {out, g.pred, g.target, g.logvar};
}

LikelihoodForwardResult likelihood_forward_cpu(const std::string& loss, const at::Tensor& pred, const at::Tensor& target,
                                               const std::optional<at::Tensor>& logvar, double fixed_logvar,
                                               double constant, bool per_element, bool pred_grad, bool target_grad,
                                               bool logvar_grad, double grad_scale, bool group_logvar_grad) {
  return likelihood_forward_impl(loss, pred, target, logvar, fixed_logvar, constant, per_element, pred_grad,
                                 target_grad, logvar_grad, grad_scale, group_logvar_grad, false);
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
LikelihoodForwardResult likelihood_forward_cuda(const std::string& loss, const at::Tensor& pred,
                                                const at::Tensor& target, const std::optional<at::Tensor>& logvar,
                                                double fixed_logvar, double constant, bool per_element,
                                                bool pred_grad, bool target_grad, bool logvar_grad,
                                                double grad_scale, bool group_logvar_grad) {
  return likelihood_forward_impl(loss, pred, target, logvar, fixed_logvar, constant, per_element, pred_grad,
                                 target_grad, logvar_grad, grad_scale, group_logvar_grad, true);
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  cuda::scale_unless_one(grad.data_ptr(), kernel_dtype(grad, "grad"), grad.numel(), scale.data_ptr<float>(),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

// ------------------------------------------------------------------------------------ vector quantisation

at::Tensor check_codebook(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(codebook.dim() == 2, "codebook must be 2-D [K, D], got shape ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) > 0, "codebook must have at least one code (K = 0)");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == codebook.size(1), "x must be [..., D] with D = ", codebook.size(1),
                    " (the codebook's), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == codebook.device(), "x and codebook must be on the same device");
  kernel_dtype(x, "x");
  kernel_dtype(codebook, "codebook");
  return x.reshape({-1, codebook.size(1)});
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook, bool exact) {
  // Called under torch.autocast, the op still has autocast's keys in effect: without this guard the
  // float32 GEMM of the search would be recast to bfloat16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x2 = check_codebook(x, codebook);
  const auto rows_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor idx = at::empty({x2.size(0)}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({x2.size(0)}, x.options().dtype(at::kFloat));
  if (x2.size(0) > 0) cpu::nearest_code(x2, codebook, idx, dist);
  return {idx.view(rows_shape), dist.view(rows_shape)};
}

#ifdef PYVAE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook, bool exact) {
  const at::Tensor x_rows = check_codebook(x, codebook);  // one copy at most, e.g. for a permuted x
  const at::Tensor x2 = as_rows(x_rows, x_rows.size(0), x_rows.size(1));
  const at::Tensor e = as_rows(codebook, codebook.size(0), codebook.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto rows_shape = x.sizes().slice(0, x.dim() - 1);
  const at::Tensor code_sq = e.to(at::kFloat).square().sum(1);
  at::Tensor idx = at::empty({x2.size(0)}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({x2.size(0)}, x.options().dtype(at::kFloat));
  NearestCodeParams p{kernel_dtype(x, "x"), kernel_dtype(codebook, "codebook"), x2.data_ptr(), e.data_ptr(),
                      x2.stride(0), e.stride(0), x2.size(0), e.size(0), e.size(1), code_sq.data_ptr<float>(),
                      idx.data_ptr<int64_t>(), dist.data_ptr<float>(), exact};
  cuda::nearest_code(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {idx.view(rows_shape), dist.view(rows_shape)};
}
#endif

void check_codebook_stats(const at::Tensor& x, const at::Tensor& idx, int64_t num_codes) {
  TORCH_CHECK_VALUE(num_codes > 0, "num_codes must be positive, got ", num_codes);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "indices must be int64, got ", idx.scalar_type());
  kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && idx.numel() * (x.dim() ? x.size(-1) : 1) == x.numel(),
                    "indices must have x's shape without its last dim, got ", idx.sizes(), " for x ", x.sizes());
  TORCH_CHECK_VALUE(idx.device() == x.device(), "indices must be on the device of x");
}

std::tuple<at::Tensor, at::Tensor> codebook_stats_cpu(const at::Tensor& x, const at::Tensor& idx, int64_t num_codes) {
  check_codebook_stats(x, idx, num_codes);
  const at::Tensor x2 = x.reshape({idx.numel(), x.size(-1)});
  const at::Tensor i1 = idx.reshape({-1}).contiguous();
  if (i1.numel() > 0) {
    const int64_t lo = i1.min().item<int64_t>(), hi = i1.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_codes, "indices must lie in [0, num_codes = ", num_codes, "), got [", lo,
                      ", ", hi, "]");
  }
  at::Tensor counts = at::empty({num_codes}, x.options().dtype(at::kFloat));
  at::Tensor sums = at::empty({num_codes, x.size(-1)}, x.options().dtype(at::kFloat));
  cpu::codebook_stats(x2, i1, counts, sums);
  return {counts, sums};
}

#ifdef PYVAE_WITH_CUDA
// The indices' range is not checked here (that would read them back to the host): the Python API
// checks it; out-of-range indices fail the scatter's device-side assertion.
std::tuple<at::Tensor, at::Tensor> codebook_stats_cuda(const at::Tensor& x, const at::Tensor& idx, int64_t num_codes) {
  check_codebook_stats(x, idx, num_codes);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = idx.numel(), dim = x.size(-1);
  const at::Tensor x2 = as_rows(x, rows, dim);
  const at::Tensor flat = idx.reshape({-1});
  const at::Tensor counts = at::zeros({num_codes}, idx.options()).scatter_add_(0, flat, at::ones_like(flat));
  at::Tensor sums = at::zeros({num_codes, dim}, x.options().dtype(at::kFloat));
  if (rows > 0 && dim > 0) {
    const at::Tensor order = std::get<1>(at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    const at::Tensor starts = counts.cumsum(0) - counts;
    const at::Tensor chunk_end = at::floor_divide(counts + (kStatsChunkRows - 1), kStatsChunkRows).cumsum(0);
    // every chunk holds a row, and each code's count rounds up to whole chunks
    const int64_t max_chunks = std::min(rows, num_codes + (rows + kStatsChunkRows - 1) / kStatsChunkRows);
    const at::Tensor chunk_code =
        at::searchsorted(chunk_end, at::arange(max_chunks, idx.options()), /*out_int32=*/false, /*right=*/true);
    at::Tensor partial = at::empty({max_chunks, dim}, x.options().dtype(at::kFloat));
    const CodebookStatsParams p{kernel_dtype(x, "x"), x2.data_ptr(), x2.stride(0), rows, dim, num_codes,
                                order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                chunk_end.data_ptr<int64_t>(), chunk_code.data_ptr<int64_t>(), max_chunks,
                                partial.data_ptr<float>(), sums.data_ptr<float>()};
    cuda::codebook_stats(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {counts.to(at::kFloat), sums};
}
#endif

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY(pyvae, m) {
  // z: [n_samples, *mu.shape] in mu's dtype; kl (float32): mu.shape if kl_per_element else mu.shape[:-1];
  // seed_used: 0-d int64 on mu's device, the Philox key (seed, or one drawn from torch's generator
  // for mu's device when seed is None) that backward regenerates eps from.
  // The KL is taken against N(prior_mu, exp(prior_logvar)) (tensors of mu's dtype and device that
  // broadcast to mu; either alone means 0 for the other), or N(0, I) when both are None.
  m.def("reparam_kl_forward(Tensor mu, Tensor logvar, int? seed, int n_samples, bool kl_per_element, "
        "Tensor? prior_mu=None, Tensor? prior_logvar=None) "
        "-> (Tensor z, Tensor kl, Tensor seed_used)",
        {at::Tag::nondeterministic_seeded});
  // seed: forward's seed_used; grad_z: [n_samples, *mu.shape]; grad_kl: float32 of mu's shape
  // (an expanded view is fine); the prior as in forward. grad_prior_mu / grad_prior_logvar: in the
  // prior's shape and dtype (summed over its broadcast dims) where prior_mu_grad / prior_logvar_grad
  // ask for them, else empty.
  m.def("reparam_kl_backward(Tensor mu, Tensor logvar, Tensor seed, Tensor? grad_z, Tensor? grad_kl, "
        "Tensor? prior_mu=None, Tensor? prior_logvar=None, bool prior_mu_grad=False, bool prior_logvar_grad=False) "
        "-> (Tensor grad_mu, Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar)");
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
  // idx (int64) and dist (float32 squared L2) of x's nearest code, both of x.shape[:-1]; exact=false
  // allows reduced-precision matrix units where the backend has them.
  m.def("nearest_code(Tensor x, Tensor codebook, bool exact) -> (Tensor idx, Tensor dist)");
  // counts [K] and sums [K, D] (float32) of the rows of x assigned to each code, in a fixed order.
  m.def("codebook_stats(Tensor x, Tensor idx, int num_codes) -> (Tensor counts, Tensor sums)");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("reparam_kl_forward", &pyvae::reparam_kl_forward_cpu);
  m.impl("reparam_kl_backward", &pyvae::reparam_kl_backward_cpu);
  m.impl("likelihood_forward", &pyvae::likelihood_forward_cpu);
  m.impl("scale_grad_", &pyvae::scale_grad_cpu);
  m.impl("nearest_code", &pyvae::nearest_code_cpu);
  m.impl("codebook_stats", &pyvae::codebook_stats_cpu);
}

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("reparam_kl_forward", &pyvae::reparam_kl_forward_cuda);
  m.impl("reparam_kl_backward", &pyvae::reparam_kl_backward_cuda);
  m.impl("likelihood_forward", &pyvae::likelihood_forward_cuda);
  m.impl("scale_grad_", &pyvae::scale_grad_cuda);
  m.impl("nearest_code", &pyvae::nearest_code_cuda);
  m.impl("codebook_stats", &pyvae::codebook_stats_cuda);
}
#endif
