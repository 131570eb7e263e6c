// Reuse of large CPU output buffers across calls.
//
// glibc serves allocations above its mmap threshold (32 MiB at most) with fresh mappings and
// unmaps them on free, so each call's large outputs page-fault all of their memory in again. On
// the 2-core VM of our CI that doubles the Bernoulli loss's forward+backward at 4096 x 4096
// (bench/results/cpu-no-buffer-cache/ against bench/results/cpu/). Like PyTorch's CUDA caching allocator, this cache keeps freed blocks
// of at least kMinCachedBytes and hands them out again for requests of the same size (a training
// loop repeats its shapes); over a byte limit it gives back the least recently freed blocks. The limit is PYVAE_CPU_CACHE_MB (default 1024;
// 0 turns caching off), read once; empty_cache() gives every cached block back to the system.
#pragma once
#include <ATen/ATen.h>

#include <cstddef>

namespace pyvae::cpu {

constexpr size_t kMinCachedBytes = size_t{1} << 20;

// A contiguous, uninitialised CPU tensor whose storage comes from the cache.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

size_t cached_bytes();  // held for reuse now (not counting blocks in use)
void empty_cache();

}  // namespace pyvae::cpu
