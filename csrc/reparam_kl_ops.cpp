// The reparameterize + KL op family: schemas of torch.ops.pyvae.reparam_kl_forward / _backward and
// their CPU and CUDA implementations, which check the tensors, view them as [rows, cols], allocate
// the outputs, resolve the Philox key (an explicit seed, torch's CPU generator, or the CUDA
// generator's state read by the kernel itself) and call the torch-free kernels in cpu/ and cuda/.
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "common/reparam_kl_params.h"
#include "cpu/reparam_kl.h"
#include "ops_common.h"
#ifdef PYVAE_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>

#include "cuda/reparam_kl.h"
#endif

namespace pyvae {
namespace {

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
                              in.logvar.stride(0), rows, cols, false, 0.0f, 0.0f};
  return in;
}

// A prior tensor as the kernels read it: broadcast to mu's shape and viewed as [rows, cols] in place
// (stride 0 along the broadcast dims: a [Z] or [1, Z] prior is one row read by every row), copied
// only where no such view exists (e.g. [A, 1, Z] for an [A, B, Z] mu) or the columns are strided.
at::Tensor prior_rows(const at::Tensor& t, const char* name, const at::Tensor& mu, int64_t rows, int64_t cols) {
  TORCH_CHECK_TYPE(t.scalar_type() == mu.scalar_type(), name, " must have the dtype of mu (", mu.scalar_type(),
                   "), got ", t.scalar_type());
  PYVAE_CHECK_DEVICE_OF(t, name, mu, "mu");
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

const int64_t* check_seed_tensor(const at::Tensor& seed, const at::Tensor& input, const char* input_name) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "seed must be a one-element int64 tensor (the seed_used output of forward)");
  TORCH_CHECK_VALUE(seed.device() == input.device(), "seed must be on the device of ", input_name, " (",
                    input.device(), "), got ", seed.device());
  return seed.data_ptr<int64_t>();
}

// A key for seed=None on the CPU: the next 63 bits of torch's default CPU generator.
int64_t draw_cpu_key() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64() >> 1);
}

// z [n_samples, *latent], the KL (float32, latent or latent[:-1]) and the 0-d key, for mu of shape
// `latent` (the packed ops: params.shape[:-2] + [Z]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward(at::IntArrayRef latent,
                                                                 const at::TensorOptions& options,
                                                                 int64_t n_samples, bool kl_per_element) {
  TORCH_CHECK_VALUE(n_samples >= 1, "n_samples must be >= 1, got ", n_samples);
  std::vector<int64_t> z_shape{n_samples};
  z_shape.insert(z_shape.end(), latent.begin(), latent.end());
  at::Tensor z = new_output(z_shape, options);
  at::Tensor kl = kl_per_element ? new_output(latent, options.dtype(at::kFloat))
                                 : at::empty(latent.slice(0, latent.size() - 1), options.dtype(at::kFloat));
  at::Tensor seed_used = at::empty({}, options.dtype(at::kLong));
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

// The upstream gradients' checks and kernel fields. `input` names the tensor whose dtype and
// device they must share (mu, or the packed ops' params); `latent` is mu's shape; grad_z has a
// leading samples dim for reparam_kl_backward, none for the packed op (one sample).
ReparamKLBackwardParams backward_params(const CheckedInputs& in, const at::Tensor& seed,
                                        const std::optional<at::Tensor>& grad_z,
                                        const std::optional<at::Tensor>& grad_kl, const at::Tensor& input,
                                        at::IntArrayRef latent, bool samples_dim, BackwardBuffers& buf) {
  const char* input_name = samples_dim ? "mu" : "params";
  ReparamKLBackwardParams p{};
  p.in = in.kernel;
  p.seed = check_seed_tensor(seed, input, input_name);
  p.samples = 0;
  if (grad_z.has_value()) {
    if (samples_dim) {
      TORCH_CHECK_VALUE(grad_z->dim() == static_cast<int64_t>(latent.size()) + 1 && grad_z->sizes().slice(1) == latent,
                        "grad_z must have shape [n_samples, *mu.shape], got ", grad_z->sizes());
    } else {
      TORCH_CHECK_VALUE(grad_z->sizes() == latent, "grad_z must have the shape of z, ", latent, ", got ",
                        grad_z->sizes());
    }
    TORCH_CHECK_TYPE(grad_z->scalar_type() == input.scalar_type(), "grad_z must have the dtype of ", input_name);
    TORCH_CHECK_VALUE(grad_z->device() == input.device(), "grad_z must be on the device of ", input_name, " (",
                      input.device(), "), got ", grad_z->device());
    p.samples = samples_dim ? grad_z->size(0) : 1;
    // read in place, an expanded gradient (z.sum()'s) too; copied only if its columns are strided
    buf.grad_z = grad_z->reshape({p.samples, in.kernel.rows, in.kernel.cols});
    if (in.kernel.cols > 1 && buf.grad_z.stride(2) != 0 && buf.grad_z.stride(2) != 1)
      buf.grad_z = buf.grad_z.contiguous();
    p.grad_z = buf.grad_z.data_ptr();
    p.grad_z_sample_stride = buf.grad_z.stride(0);
    p.grad_z_row_stride = buf.grad_z.stride(1);
    p.grad_z_col_stride = in.kernel.cols > 1 ? buf.grad_z.stride(2) : 1;
  }
  if (grad_kl.has_value()) {
    TORCH_CHECK_VALUE(grad_kl->sizes() == latent, "grad_kl must have the shape of ", samples_dim ? "mu" : "z",
                      " (expanded if need be), got ", grad_kl->sizes());
    TORCH_CHECK_TYPE(grad_kl->scalar_type() == at::kFloat, "grad_kl must be float32");
    TORCH_CHECK_VALUE(grad_kl->device() == input.device(), "grad_kl must be on the device of ", input_name, " (",
                      input.device(), "), got ", grad_kl->device());
    buf.grad_kl = grad_kl->reshape({in.kernel.rows, in.kernel.cols});  // a view for expanded per-row/scalar grads
    p.grad_kl = buf.grad_kl.data_ptr<float>();
    p.grad_kl_row_stride = buf.grad_kl.stride(0);
    p.grad_kl_col_stride = buf.grad_kl.stride(1);
  }
  return p;
}

// reparam_kl_backward's outputs: grad_mu and grad_logvar, each [rows, cols] contiguous.
void allocate_input_grads(const at::Tensor& mu, ReparamKLBackwardParams& p, BackwardBuffers& buf) {
  buf.grad_mu = new_output(mu.sizes(), mu.options());
  buf.grad_logvar = new_output(mu.sizes(), mu.options());
  p.grad_mu = buf.grad_mu.data_ptr();
  p.grad_logvar = buf.grad_logvar.data_ptr();
  p.grad_mu_row_stride = p.grad_logvar_row_stride = p.in.cols;
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

// The packed ops' params [..., 2, Z] as the kernels read it: mu = params[..., 0, :] and
// logvar = params[..., 1, :], rows of 2 Z apart (in place where the strides allow, else a copy),
// with the clamp of the log-variance asked for. `latent` is z's shape, params.shape[:-2] + [Z].
struct PackedInputs {
  at::Tensor params;  // [rows, 2, cols], what the kernel pointers point into
  CheckedInputs in;
  std::vector<int64_t> latent;
};

PackedInputs check_packed(const at::Tensor& params, std::optional<double> logvar_min,
                          std::optional<double> logvar_max) {
  TORCH_CHECK_VALUE(params.dim() >= 2 && params.size(-2) == 2,
                    "params must have shape [..., 2, Z] (mean and log-variance stacked along dim -2), got ",
                    params.sizes());
  const DType dtype = kernel_dtype(params, "params");
  TORCH_CHECK_VALUE(!(logvar_min.has_value() && std::isnan(*logvar_min)) &&
                        !(logvar_max.has_value() && std::isnan(*logvar_max)),
                    "logvar_min and logvar_max must not be NaN");
  TORCH_CHECK_VALUE(!logvar_min.has_value() || !logvar_max.has_value() || *logvar_min <= *logvar_max,
                    "logvar_min must be <= logvar_max");
  const int64_t cols = params.size(-1);
  const int64_t rows = c10::multiply_integers(params.sizes().slice(0, params.dim() - 2));
  PackedInputs pk;
  pk.params = params.reshape({rows, 2, cols});
  if (cols > 1 && pk.params.stride(2) != 1) pk.params = pk.params.contiguous();
  pk.latent.assign(params.sizes().begin(), params.sizes().end() - 2);
  pk.latent.push_back(cols);
  pk.in.mu = pk.params.select(1, 0);
  pk.in.logvar = pk.params.select(1, 1);
  pk.in.kernel = ReparamKLInputs{dtype, pk.in.mu.data_ptr(), pk.in.logvar.data_ptr(), pk.params.stride(0),
                                 pk.params.stride(0), rows, cols, logvar_min.has_value() || logvar_max.has_value(),
                                 logvar_min.has_value() ? static_cast<float>(*logvar_min) : -INFINITY,
                                 logvar_max.has_value() ? static_cast<float>(*logvar_max) : INFINITY};
  return pk;
}

// The packed backward's output, [..., 2, Z] like params (contiguous): grad_mu and grad_logvar are
// its two halves, rows 2 Z apart.
at::Tensor allocate_packed_grad(const at::Tensor& params, ReparamKLBackwardParams& p) {
  at::Tensor grad_params = new_output(params.sizes(), params.options());
  const int64_t element = static_cast<int64_t>(grad_params.element_size());
  p.grad_mu = grad_params.data_ptr();
  p.grad_logvar = static_cast<char*>(grad_params.data_ptr()) + p.in.cols * element;
  p.grad_mu_row_stride = p.grad_logvar_row_stride = 2 * p.in.cols;
  return grad_params;
}

using ForwardOnDevice = ForwardResult (*)(const CheckedInputs&, const CheckedPrior&, at::IntArrayRef,
                                           const at::TensorOptions&, std::optional<int64_t>, int64_t, bool);

// The packed forward on the device of `Forward` (forward_cpu or forward_cuda): one sample of z,
// without its samples dim.
template <ForwardOnDevice Forward>
ForwardResult packed_forward(const at::Tensor& params, std::optional<int64_t> seed, bool kl_per_element,
                             std::optional<double> logvar_min, std::optional<double> logvar_max) {
  const PackedInputs pk = check_packed(params, logvar_min, logvar_max);
  auto [z, kl, seed_used] = Forward(pk.in, CheckedPrior{}, pk.latent, params.options(), seed, 1, kl_per_element);
  return {z.select(0, 0), kl, seed_used};
}

// The packed backward's checks, shared by the devices; `run(p)` allocates the gradient of params
// and launches the device's kernel.
template <typename Run>
at::Tensor packed_backward(const at::Tensor& params, const at::Tensor& seed, const std::optional<at::Tensor>& grad_z,
                           const std::optional<at::Tensor>& grad_kl, std::optional<double> logvar_min,
                           std::optional<double> logvar_max, const Run& run) {
  const PackedInputs pk = check_packed(params, logvar_min, logvar_max);
  BackwardBuffers buf;  // holds grad_z and grad_kl's views while the kernel reads them
  ReparamKLBackwardParams p = backward_params(pk.in, seed, grad_z, grad_kl, params, pk.latent, false, buf);
  return run(p);
}

// ---------------------------------------------------------------------------- CPU
ForwardResult forward_cpu(const CheckedInputs& in, const CheckedPrior& prior, at::IntArrayRef latent,
                          const at::TensorOptions& options, std::optional<int64_t> seed, int64_t n_samples,
                          bool kl_per_element) {
  check_seed_value(seed);
  auto [z, kl, seed_used] = allocate_forward(latent, options, n_samples, kl_per_element);
  ReparamKLForwardParams p = forward_params(in, n_samples, kl_per_element, z, kl, seed_used);
  p.seed.key = seed.has_value() ? *seed : draw_cpu_key();
  *p.seed.key_out = p.seed.key;
  if (in.kernel.cols == 0) kl.zero_();  // an empty sum per row
  if (in.kernel.rows > 0 && in.kernel.cols > 0) cpu::reparam_kl_forward(p, prior.kernel);
  return {z, kl, seed_used};
}

ForwardResult reparam_kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar, std::optional<int64_t> seed,
                                     int64_t n_samples, bool kl_per_element,
                                     const std::optional<at::Tensor>& prior_mu,
                                     const std::optional<at::Tensor>& prior_logvar) {
  CheckedInputs in = check_inputs(mu, logvar);
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);
  return forward_cpu(in, prior, mu.sizes(), mu.options(), seed, n_samples, kl_per_element);
}

BackwardResult reparam_kl_backward_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                                       const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
                                       const std::optional<at::Tensor>& prior_mu,
                                       const std::optional<at::Tensor>& prior_logvar, bool prior_mu_grad,
                                       bool prior_logvar_grad) {
  CheckedInputs in = check_inputs(mu, logvar);
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);
  BackwardBuffers buf;
  ReparamKLBackwardParams p = backward_params(in, seed, grad_z, grad_kl, mu, mu.sizes(), true, buf);
  allocate_input_grads(mu, p, buf);
  allocate_prior_grads(prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu, p, buf);
  if (in.kernel.rows > 0 && in.kernel.cols > 0) cpu::reparam_kl_backward(p, prior.kernel, buf.prior_grads);
  return backward_result(buf, prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu);
}

ForwardResult reparam_kl_packed_forward_cpu(const at::Tensor& params, std::optional<int64_t> seed,
                                            bool kl_per_element, std::optional<double> logvar_min,
                                            std::optional<double> logvar_max) {
  return packed_forward<forward_cpu>(params, seed, kl_per_element, logvar_min, logvar_max);
}

at::Tensor reparam_kl_packed_backward_cpu(const at::Tensor& params, const at::Tensor& seed,
                                          const std::optional<at::Tensor>& grad_z,
                                          const std::optional<at::Tensor>& grad_kl, std::optional<double> logvar_min,
                                          std::optional<double> logvar_max) {
  return packed_backward(params, seed, grad_z, grad_kl, logvar_min, logvar_max, [&](ReparamKLBackwardParams& p) {
    at::Tensor grad_params = allocate_packed_grad(params, p);
    if (p.in.rows > 0 && p.in.cols > 0) cpu::reparam_kl_backward(p, ReparamKLPrior{}, ReparamKLPriorGrads{});
    return grad_params;
  });
}

// ---------------------------------------------------------------------------- CUDA
#ifdef PYVAE_WITH_CUDA
ForwardResult forward_cuda(const CheckedInputs& in, const CheckedPrior& prior, at::IntArrayRef latent,
                           const at::TensorOptions& options, std::optional<int64_t> seed, int64_t n_samples,
                           bool kl_per_element) {
  check_seed_value(seed);
  const c10::cuda::CUDAGuard guard(options.device());
  auto [z, kl, seed_used] = allocate_forward(latent, options, n_samples, kl_per_element);
  ReparamKLForwardParams p = forward_params(in, n_samples, kl_per_element, z, kl, seed_used);
  if (seed.has_value()) {
    p.seed.key = *seed;
  } else {
    // The generator's (seed, offset) is read by the kernel itself, so drawing costs no launch and
    // no host sync, and a captured graph gets a fresh offset on every replay (as dropout does).
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(options.device().index()));
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

ForwardResult reparam_kl_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar, std::optional<int64_t> seed,
                                      int64_t n_samples, bool kl_per_element,
                                      const std::optional<at::Tensor>& prior_mu,
                                      const std::optional<at::Tensor>& prior_logvar) {
  CheckedInputs in = check_inputs(mu, logvar);
  const CheckedPrior prior = check_prior(prior_mu, prior_logvar, mu, in);
  return forward_cuda(in, prior, mu.sizes(), mu.options(), seed, n_samples, kl_per_element);
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
  // checks every device
  ReparamKLBackwardParams p = backward_params(in, seed, grad_z, grad_kl, mu, mu.sizes(), true, buf);
  const c10::cuda::CUDAGuard guard(mu.device());
  allocate_input_grads(mu, p, buf);
  allocate_prior_grads(prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu, p, buf);
  cuda::reparam_kl_backward(p, prior.kernel, buf.prior_grads, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return backward_result(buf, prior_mu, prior_logvar, prior_mu_grad, prior_logvar_grad, mu);
}

ForwardResult reparam_kl_packed_forward_cuda(const at::Tensor& params, std::optional<int64_t> seed,
                                             bool kl_per_element, std::optional<double> logvar_min,
                                             std::optional<double> logvar_max) {
  return packed_forward<forward_cuda>(params, seed, kl_per_element, logvar_min, logvar_max);
}

at::Tensor reparam_kl_packed_backward_cuda(const at::Tensor& params, const at::Tensor& seed,
                                           const std::optional<at::Tensor>& grad_z,
                                           const std::optional<at::Tensor>& grad_kl, std::optional<double> logvar_min,
                                           std::optional<double> logvar_max) {
  return packed_backward(params, seed, grad_z, grad_kl, logvar_min, logvar_max, [&](ReparamKLBackwardParams& p) {
    const c10::cuda::CUDAGuard guard(params.device());
    at::Tensor grad_params = allocate_packed_grad(params, p);
    cuda::reparam_kl_backward(p, ReparamKLPrior{}, ReparamKLPriorGrads{}, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return grad_params;
  });
}
#endif

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
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
  // The packed form, one sample, prior N(0, I): params [..., 2, Z] holds mu (params[..., 0, :]) and
  // logvar (params[..., 1, :]), the log-variance clamped to [logvar_min, logvar_max] first
  // (torch.clamp's values and gradient; None: that side unclamped). z: params.shape[:-2] + [Z];
  // kl and seed_used as above. Backward returns the gradient of params, in one [..., 2, Z] tensor,
  // so that a caller who split an encoder's output in two gets its gradient without a cat.
  m.def("reparam_kl_packed_forward(Tensor params, int? seed, bool kl_per_element, float? logvar_min=None, "
        "float? logvar_max=None) -> (Tensor z, Tensor kl, Tensor seed_used)",
        {at::Tag::nondeterministic_seeded});
  m.def("reparam_kl_packed_backward(Tensor params, Tensor seed, Tensor? grad_z, Tensor? grad_kl, "
        "float? logvar_min=None, float? logvar_max=None) -> Tensor grad_params");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("reparam_kl_forward", &pyvae::reparam_kl_forward_cpu);
  m.impl("reparam_kl_backward", &pyvae::reparam_kl_backward_cpu);
  m.impl("reparam_kl_packed_forward", &pyvae::reparam_kl_packed_forward_cpu);
  m.impl("reparam_kl_packed_backward", &pyvae::reparam_kl_packed_backward_cpu);
}

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("reparam_kl_forward", &pyvae::reparam_kl_forward_cuda);
  m.impl("reparam_kl_backward", &pyvae::reparam_kl_backward_cuda);
  m.impl("reparam_kl_packed_forward", &pyvae::reparam_kl_packed_forward_cuda);
  m.impl("reparam_kl_packed_backward", &pyvae::reparam_kl_packed_backward_cuda);
}
#endif
