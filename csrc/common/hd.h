// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds of csrc/common.
#pragma once

#if defined(__CUDACC__)
#define PYVAE_HD __host__ __device__ __forceinline__
#else
#define PYVAE_HD inline __attribute__((always_inline))
#endif
