// The Python extension module pyvae._C. Loading it runs the operator registrations of every op
// family (csrc/<family>_ops.cpp: TORCH_LIBRARY_FRAGMENT schemas, TORCH_LIBRARY_IMPL kernels); the
// module itself reports how it was built (python -m pyvae prints these) and the constants that the
// other backends must share with the C++ kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/likelihood_params.h"
#include "common/vq_params.h"
#include "cpu/buffer_cache.h"

#ifndef PYVAE_VERSION
#define PYVAE_VERSION "unknown"
#endif
#ifndef PYVAE_CUDA_ARCHS
#define PYVAE_CUDA_ARCHS ""
#endif

// The pyvae operator namespace, defined once (a second definition elsewhere fails at load); each op
// family adds its schemas to it with TORCH_LIBRARY_FRAGMENT(pyvae, m).
TORCH_LIBRARY(pyvae, m) {}

namespace {

// Every constant that the Triton kernels or pyvae's Python side must agree on with the C++ kernels,
// by name; pyvae/_constants.py reads them (and keeps the copy that a build without this module uses).
pybind11::dict shared_constants() {
  namespace f = pyvae::likelihood_flags;
  pybind11::dict flags;
  flags["per_element"] = f::kPerElement;
  flags["grad_pred"] = f::kGradPred;
  flags["grad_target"] = f::kGradTarget;
  flags["grad_logvar"] = f::kGradLogvar;
  flags["group_logvar_grad"] = f::kGroupLogvarGrad;
  pybind11::dict constants;
  constants["likelihood_column_block"] = pyvae::kLikelihoodColumnBlock;
  constants["logvar_group_rows"] = pyvae::kLogvarGroupRows;
  constants["stats_chunk_rows"] = pyvae::kStatsChunkRows;
  constants["likelihood_flags"] = flags;
  return constants;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyvae native kernels (operators are registered under torch.ops.pyvae)";
  m.attr("version") = PYVAE_VERSION;
#ifdef PYVAE_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(PYVAE_CUDA_ARCHS);
  m.def("cpu_cache_bytes", &pyvae::cpu::cached_bytes,
        "Bytes of freed CPU output buffers held for reuse (limit: PYVAE_CPU_CACHE_MB, default 1024)");
  m.def("empty_cpu_cache", &pyvae::cpu::empty_cache, "Give every cached CPU output buffer back to the system");
  m.def("shared_constants", &shared_constants,
        "The constants every backend must agree on with the C++ kernels (a new dict on each call)");
}
