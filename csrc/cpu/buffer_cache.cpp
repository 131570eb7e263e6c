#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <iterator>
#include <list>
#include <vector>

namespace pyvae::cpu {
namespace {

size_t limit_from_env() {
  const char* mb = std::getenv("PYVAE_CPU_CACHE_MB");
  return (mb != nullptr ? static_cast<size_t>(std::strtoull(mb, nullptr, 10)) : size_t{1024}) << 20;
}

struct Block {
  void* data;
  size_t bytes;
};

class BufferCache final : public c10::Allocator {
 public:
  at::DataPtr allocate(size_t bytes) override {
    void* data = bytes >= kMinCachedBytes ? take(bytes) : nullptr;
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    report_to_profiler(data, static_cast<int64_t>(bytes));
    return {data, new Block{data, bytes}, &BufferCache::release, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Block& block : free_) c10::free_cpu(block.data);
    free_.clear();
    cached_bytes_ = 0;
  }

  // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

 private:
  // The most recently freed block of exactly this size (a loop repeats its shapes), if any.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* data = it->data;
      free_.erase(std::next(it).base());
      cached_bytes_ -= bytes;
      return data;
    }
    return nullptr;
  }

  // The storage's deleter: keep the block, giving back the least recently freed ones while the
  // cache is over its limit (so sizes a program no longer uses do not stay forever).
  static void release(void* ctx) {
    const Block block = *static_cast<Block*>(ctx);
    delete static_cast<Block*>(ctx);
    BufferCache& cache = instance();
    cache.report_to_profiler(block.data, -static_cast<int64_t>(block.bytes));
    if (block.bytes < kMinCachedBytes || block.bytes > cache.limit_) {
      c10::free_cpu(block.data);
      return;
    }
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.free_.push_back(block);
      cache.cached_bytes_ += block.bytes;
      while (cache.cached_bytes_ > cache.limit_) {
        evicted.push_back(cache.free_.front().data);
        cache.cached_bytes_ -= cache.free_.front().bytes;
        cache.free_.pop_front();
      }
    }
    for (void* data : evicted) c10::free_cpu(data);
  }

  // Tensors handed out and given back, as PyTorch's CPU allocator reports its own (what the
  // profiler's memory view counts): blocks held in the cache are not live.
  void report_to_profiler(void* data, int64_t delta) {
    const int64_t live = live_bytes_.fetch_add(delta) + delta;
    c10::reportMemoryUsageToProfiler(data, delta, static_cast<size_t>(live), static_cast<size_t>(live),
                                     at::Device(at::kCPU));
  }

  std::atomic<int64_t> live_bytes_{0};
  std::mutex mutex_;
  std::list<Block> free_;  // oldest first
  size_t cached_bytes_ = 0;
  const size_t limit_ = limit_from_env();
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &BufferCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

size_t cached_bytes() { return BufferCache::instance().cached_bytes(); }

void empty_cache() { BufferCache::instance().clear(); }

}  // namespace pyvae::cpu
