#include "stoker/pool/buffer_pool.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace stoker {

struct BufferPool::State {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;  // exact size -> cached blocks
  size_t max_cached = 0;
  PoolStats stats;

  ~State() {
    for (auto& [size, list] : free)
      for (void* p : list) std::free(p);
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      --stats.outstanding;
      if (static_cast<size_t>(stats.cached_bytes) + bytes <= max_cached) {
        free[bytes].push_back(p);
        stats.cached_bytes += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }
};

BufferPool::BufferPool(size_t max_cached_bytes) : state_(std::make_shared<State>()) {
  state_->max_cached = max_cached_bytes;
}

BufferPool::~BufferPool() = default;

std::shared_ptr<Block> BufferPool::acquire(size_t bytes) {
  constexpr size_t kAlign = 64;
  const size_t size = bytes == 0 ? kAlign : (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto it = state_->free.find(size);
    if (it != state_->free.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      state_->stats.cached_bytes -= static_cast<int64_t>(size);
      ++state_->stats.reuses;
    } else {
      ++state_->stats.allocations;
    }
    ++state_->stats.outstanding;
  }
  if (p == nullptr) {
    p = std::aligned_alloc(kAlign, size);
    if (p == nullptr) {
      std::lock_guard<std::mutex> lock(state_->mu);
      --state_->stats.outstanding;
      throw std::bad_alloc();
    }
  }
  auto* block = new Block{p, size};
  std::shared_ptr<State> state = state_;
  return std::shared_ptr<Block>(block, [state](Block* b) {
    state->give_back(b->data, b->bytes);
    delete b;
  });
}

PoolStats BufferPool::stats() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->stats;
}

void BufferPool::set_max_cached_bytes(size_t bytes) {
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->max_cached = bytes;
    if (static_cast<size_t>(state_->stats.cached_bytes) > bytes) {
      for (auto& [size, list] : state_->free) {
        while (!list.empty() && static_cast<size_t>(state_->stats.cached_bytes) > bytes) {
          drop.push_back(list.back());
          list.pop_back();
          state_->stats.cached_bytes -= static_cast<int64_t>(size);
        }
      }
    }
  }
  for (void* p : drop) std::free(p);
}

}  // namespace stoker
