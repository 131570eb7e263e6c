// The vector-quantisation op family: schemas of torch.ops.pyvae.nearest_code (the nearest code of
// every row, without an N x K distance matrix) and codebook_stats (per-code counts and sums, in a
// fixed order), and their CPU and CUDA implementations.
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>

#include "common/vq_params.h"
#include "cpu/vq.h"
#include "ops_common.h"
#ifdef PYVAE_WITH_CUDA
#include "cuda/vq.h"
#endif

namespace pyvae {
namespace {

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

void check_codebook_stats(const at::Tensor& x, const at::Tensor& idx, int64_t num_codes) {
  TORCH_CHECK_VALUE(num_codes > 0, "num_codes must be positive, got ", num_codes);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "indices must be int64, got ", idx.scalar_type());
  kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && idx.numel() * (x.dim() ? x.size(-1) : 1) == x.numel(),
                    "indices must have x's shape without its last dim, got ", idx.sizes(), " for x ", x.sizes());
  TORCH_CHECK_VALUE(idx.device() == x.device(), "indices must be on the device of x");
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

// The per-code sums of codebook_stats on CUDA, from the preparation that the Python side shares with
// the Triton backend (kernels/_layout.py codebook_stats_by_chunks; see CodebookStatsParams). The
// plan's values are not checked (that would read them back to the host), only what the kernels'
// reads depend on besides them.
at::Tensor codebook_chunk_sums_cuda(const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                                    const at::Tensor& counts, const at::Tensor& chunk_end,
                                    const at::Tensor& chunk_code) {
  kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [N, D], got shape ", x.sizes());
  const int64_t rows = x.size(0), dim = x.size(1), codes = counts.numel();
  TORCH_CHECK_VALUE(codes > 0, "counts must have an entry per code (K > 0)");
  // int64, 1-D and contiguous on x's device
  const auto check_plan = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
    TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on the device of x");
  };
  check_plan(order, "order");
  check_plan(starts, "starts");
  check_plan(counts, "counts");
  check_plan(chunk_end, "chunk_end");
  check_plan(chunk_code, "chunk_code");
  TORCH_CHECK_VALUE(order.numel() == rows, "order must have an entry per row of x");
  TORCH_CHECK_VALUE(starts.numel() == codes && chunk_end.numel() == codes,
                    "starts and chunk_end must have an entry per code, as counts has");
  TORCH_CHECK_VALUE(chunk_code.numel() > 0 || rows == 0, "chunk_code must have an entry per chunk");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor sums = at::zeros({codes, dim}, x.options().dtype(at::kFloat));
  if (rows > 0 && dim > 0) {
    const at::Tensor x2 = as_rows(x, rows, dim);
    const int64_t max_chunks = chunk_code.numel();
    at::Tensor partial = at::empty({max_chunks, dim}, x.options().dtype(at::kFloat));
    const CodebookStatsParams p{kernel_dtype(x, "x"), x2.data_ptr(), x2.stride(0), rows, dim, codes,
                                order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                chunk_end.data_ptr<int64_t>(), chunk_code.data_ptr<int64_t>(), max_chunks,
                                partial.data_ptr<float>(), sums.data_ptr<float>()};
    cuda::codebook_stats(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return sums;
}
#endif

}  // namespace
}  // namespace pyvae

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  // idx (int64) and dist (float32 squared L2) of x's nearest code, both of x.shape[:-1]; exact=false
  // allows reduced-precision matrix units where the backend has them.
  m.def("nearest_code(Tensor x, Tensor codebook, bool exact) -> (Tensor idx, Tensor dist)");
  // counts [K] and sums [K, D] (float32) of the rows of x assigned to each code, in a fixed order.
  // Its CUDA kernel is registered from Python (pyvae/ops/vq.py): the preparation it shares with the
  // Triton backend, then codebook_chunk_sums.
  m.def("codebook_stats(Tensor x, Tensor idx, int num_codes) -> (Tensor counts, Tensor sums)");
  // CUDA: sums [K, D] (float32) of the rows of x [N, D], each code's rows summed in chunks of
  // kStatsChunkRows in the given order (see CodebookStatsParams in common/vq_params.h).
  m.def("codebook_chunk_sums(Tensor x, Tensor order, Tensor starts, Tensor counts, Tensor chunk_end, "
        "Tensor chunk_code) -> Tensor sums");
}

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("nearest_code", &pyvae::nearest_code_cpu);
  m.impl("codebook_stats", &pyvae::codebook_stats_cpu);
}

#ifdef PYVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("nearest_code", &pyvae::nearest_code_cuda);
  m.impl("codebook_chunk_sums", &pyvae::codebook_chunk_sums_cuda);
}
#endif
