// The Python extension module pyvae._C. Loading it runs the operator registrations of every op
// family (csrc/<family>_ops.cpp: TORCH_LIBRARY_FRAGMENT schemas, TORCH_LIBRARY_IMPL kernels); the
// module itself only reports how it was built (python -m pyvae prints these).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyvae native kernels (operators are registered under torch.ops.pyvae)";
  m.attr("version") = PYVAE_VERSION;
#ifdef PYVAE_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(PYVAE_CUDA_ARCHS);
  m.attr("has_cpu") = true;
  m.def("cpu_cache_bytes", &pyvae::cpu::cached_bytes,
        "Bytes of freed CPU output buffers held for reuse (limit: PYVAE_CPU_CACHE_MB, default 1024)");
  m.def("empty_cpu_cache", &pyvae::cpu::empty_cache, "Give every cached CPU output buffer back to the system");
}
