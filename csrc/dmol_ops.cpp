// The discretized mixture of logistics op family: the schema of torch.ops.pyvae.dmol_forward (the
// negative log-likelihood and, in the same read of the inputs, its gradient to the parameters) and
// its CPU and CUDA implementations. The checks are those of kernels/contracts/dmol.py, word for word.
#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <vector>

#include "common/dmol_params.h"
#include "cpu/dmol.h"
#include "ops_common.h"
#ifdef PYVAE_WITH_CUDA
#include "cuda/dmol.h"
#endif

namespace pyvae {
namespace {

constexpr int64_t kDmolMaxClasses = 65536;

int64_t dmol_num_params(int64_t num_mix, int64_t channels) {
  return channels == 1 ? 3 * num_mix : num_mix * (1 + 3 * channels);
}

// The channel dim of x (and the parameter dim of params).
int64_t check_dmol(const at::Tensor& params, const at::Tensor& x, int64_t num_mix, int64_t num_classes,
                   bool channels_last) {
  TORCH_CHECK_VALUE(num_mix >= 1, "num_mix must be >= 1, got ", num_mix);
  TORCH_CHECK_VALUE(num_classes >= 2 && num_classes <= kDmolMaxClasses, "num_classes must be in [2, ",
                    kDmolMaxClasses, "], got ", num_classes);
  TORCH_CHECK_VALUE(x.dim() >= 2 && params.dim() == x.dim(),
                    "params and x must have the same number of dims, at least 2, got ", params.sizes(), " and ",
                    x.sizes());
  const int64_t ch = channels_last ? x.dim() - 1 : 1;
  const int64_t channels = x.size(ch);
  TORCH_CHECK_VALUE(channels == 1 || channels == 3, "x must have 1 or 3 channels (dim ", ch, "), got shape ",
                    x.sizes());
  bool same = params.size(ch) == dmol_num_params(num_mix, channels);
  for (int64_t d = 0; d < x.dim(); ++d) same = same && (d == ch || params.size(d) == x.size(d));
  TORCH_CHECK_VALUE(same, "params must have x's shape with ", dmol_num_params(num_mix, channels),
                    " parameters in dim ", ch, ", got ", params.sizes(), " for x ", x.sizes());
  kernel_dtype(params, "params");
  kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(params.device() == x.device(), "params and x must be on the same device");
  return ch;
}

void run_dmol(const DmolParams& p, const at::Device& device) {
  if (p.batch == 0 || p.positions == 0) return;
#ifdef PYVAE_WITH_CUDA
  if (device.is_cuda()) {
    cuda::dmol(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  cpu::dmol(p);
}

using DmolForwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;

// The strides of contiguous params [B, N, P] (channels-last) or [B, P, N] (channels-first), and of
// x [B, N, C] or [B, C, N] alike: the forward's and the sampler's kernels read both layouts through
// them.
template <typename KernelParams>
void set_contiguous_strides(KernelParams& p, int64_t positions, int64_t num_params, int64_t channels,
                            bool channels_last) {
  p.params_batch_stride = positions * num_params;
  p.params_position_stride = channels_last ? num_params : 1;
  p.params_param_stride = channels_last ? 1 : positions;
  p.x_batch_stride = positions * channels;
  p.x_position_stride = channels_last ? channels : 1;
  p.x_channel_stride = channels_last ? 1 : positions;
}

// One implementation for the CPU and CUDA keys: only the kernel launch depends on the device.
DmolForwardResult dmol_forward(const at::Tensor& params_in, const at::Tensor& x_in, int64_t num_mix,
                               int64_t num_classes, bool channels_last, bool per_position, bool want_grad,
                               double grad_scale) {
  const int64_t ch = check_dmol(params_in, x_in, num_mix, num_classes, channels_last);
  c10::OptionalDeviceGuard guard;  // after the checks: the inputs' devices are known to agree
  if (params_in.is_cuda()) guard.reset_device(params_in.device());
  const at::Tensor params = params_in.contiguous(), x = x_in.contiguous();
  std::vector<int64_t> positions_shape;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != ch) positions_shape.push_back(x.size(d));
  const int64_t batch = x.size(0), channels = x.size(ch), num_params = params.size(ch);
  const int64_t positions = batch == 0 ? 0 : x.numel() / (batch * channels);
  DmolParams p{};
  p.params_dtype = kernel_dtype(params, "params");
  p.x_dtype = kernel_dtype(x, "x");
  p.params = params.data_ptr();
  p.x = x.data_ptr();
  p.batch = batch;
  p.positions = positions;
  p.num_params = num_params;
  p.channels = channels;
  p.num_mix = num_mix;
  p.num_classes = num_classes;
  set_contiguous_strides(p, positions, num_params, channels, channels_last);
  const at::TensorOptions f32 = params.options().dtype(at::kFloat);
  at::Tensor out = per_position ? at::empty(positions_shape, f32)
                                : at::empty({batch, dmol_position_blocks(positions)}, f32);
  p.nll = out.data_ptr<float>();
  p.per_position = per_position;
  std::vector<at::Tensor> grads;
  if (want_grad) {
    grads.push_back(new_output(params.sizes(), params.options()));
    p.grad = grads.back().data_ptr();
  }
  p.grad_scale = static_cast<float>(grad_scale);
  run_dmol(p, params.device());
  if (!per_position) {
    out = positions == 0 ? at::zeros({batch}, f32) : out.size(1) == 1 ? out.view({batch}) : out.sum(1);
  }
  return {out, std::move(grads)};
}

void check_dmol_sample(const at::Tensor& params, const at::Tensor& seed, int64_t num_mix, int64_t channels,
                       bool channels_last, double temperature) {
  TORCH_CHECK_VALUE(num_mix >= 1, "num_mix must be >= 1, got ", num_mix);
  TORCH_CHECK_VALUE(channels == 1 || channels == 3, "channels must be 1 or 3, got ", channels);
  TORCH_CHECK_VALUE(params.dim() >= 2, "params must have at least 2 dims, got ", params.sizes());
  const int64_t ch = channels_last ? params.dim() - 1 : 1;
  TORCH_CHECK_VALUE(params.size(ch) == dmol_num_params(num_mix, channels), "params must have ",
                    dmol_num_params(num_mix, channels), " parameters in dim ", ch, ", got ", params.sizes());
  kernel_dtype(params, "params");
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed must be a one-element int64 tensor");
  PYVAE_CHECK_DEVICE_OF(seed, "seed", params, "params");
  TORCH_CHECK_VALUE(temperature >= 0.0, "temperature must be >= 0, got ", temperature);
}

// One implementation for the CPU and CUDA keys: only the kernel launch depends on the device.
at::Tensor dmol_sample(const at::Tensor& params_in, const at::Tensor& seed, int64_t num_mix, int64_t channels,
                       bool channels_last, double temperature) {
  check_dmol_sample(params_in, seed, num_mix, channels, channels_last, temperature);
  c10::OptionalDeviceGuard guard;
  if (params_in.is_cuda()) guard.reset_device(params_in.device());
  const at::Tensor params = params_in.contiguous();
  const int64_t ch = channels_last ? params.dim() - 1 : 1;
  std::vector<int64_t> shape = params.sizes().vec();
  shape[ch] = channels;
  at::Tensor x = at::empty(shape, params.options().dtype(at::kFloat));
  const int64_t batch = params.size(0), num_params = params.size(ch);
  const int64_t positions = batch == 0 ? 0 : params.numel() / (batch * num_params);
  DmolSampleParams p{};
  p.params_dtype = kernel_dtype(params, "params");
  p.params = params.data_ptr();
  p.seed = seed.data_ptr<int64_t>();
  p.batch = batch;
  p.positions = positions;
  p.channels = channels;
  p.num_mix = num_mix;
  set_contiguous_strides(p, positions, num_params, channels, channels_last);
  p.temperature = static_cast<float>(temperature);
  p.x = x.data_ptr<float>();
  if (batch == 0 || positions == 0) return x;
#ifdef PYVAE_WITH_CUDA
  if (params.is_cuda()) {
    cuda::dmol_sample(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return x;
  }
#endif
  cpu::dmol_sample(p);
  return x;
}

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  // The discretized mixture of logistics: params [B, P, *positions] (channels-first) or
  // [B, *positions, P] (channels_last), x the data (C = 1 or 3 channels where params has its P,
  // values on the grid k / (num_classes - 1) * 2 - 1). The NLL (float32) per position, or per
  // sample [B] (the positions' NLLs summed in blocks of kDmolPositionBlock, added in order); with
  // want_grad, in the same pass, its gradient to params times grad_scale (the reduction's factor),
  // contiguous in params' dtype: backward then only scales it. P, the formulas: pyvae/ops/dmol.py.
  m.def("dmol_forward(Tensor params, Tensor x, int num_mix, int num_classes, bool channels_last, "
        "bool per_position, bool want_grad, float grad_scale) -> (Tensor nll, Tensor[] grads)");
  // A sample of the mixture at every position (float32, in [-1, 1], params' layout with `channels`
  // channels where params has its P), keyed by `seed` (one int64 on params' device, read there):
  // the component by Gumbel-max, then each channel's logistic sample given the earlier channels;
  // `temperature` scales both noises. Position n (flat over batch and positions) draws its
  // uniforms from the Philox blocks of counter n, streams 0, 1, ...: pyvae/ops/dmol.py.
  m.def("dmol_sample(Tensor params, Tensor seed, int num_mix, int channels, bool channels_last, "
        "float temperature) -> Tensor x");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("dmol_forward", &pyvae::dmol_forward);
  m.impl("dmol_sample", &pyvae::dmol_sample);
}

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("dmol_forward", &pyvae::dmol_forward);
  m.impl("dmol_sample", &pyvae::dmol_sample);
}
#endif
