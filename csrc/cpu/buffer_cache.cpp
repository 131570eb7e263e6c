#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
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
    for (auto& [bytes, blocks] : free_)
      for (void* data : blocks) c10::free_cpu(data);
    free_.clear();
    cached_bytes_ = 0;
  }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* data = it->second.back();
    it->second.pop_back();
    cached_bytes_ -= bytes;
    return data;
  }

  // The storage's deleter: keep the block while it fits under the limit, else free it.
  static void release(void* ctx) {
    const Block* block = static_cast<Block*>(ctx);
    BufferCache& cache = instance();
    bool kept = false;
    if (block->bytes >= kMinCachedBytes) {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (cache.cached_bytes_ + block->bytes <= cache.limit_) {
        cache.free_[block->bytes].push_back(block->data);
        cache.cached_bytes_ += block->bytes;
        kept = true;
      }
    }
    if (!kept) c10::free_cpu(block->data);
    delete block;
  }

 public:
  // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
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
