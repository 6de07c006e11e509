#include "stoker/pool/buffer_pool.h"

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "stoker/cuda/driver.h"
#include "stoker/pool/fence.h"

namespace stoker {
namespace {

// fork() safety. A child process has only the thread that forked; had another thread held a pool's mutex at
// that moment, the child's copy would stay locked forever (a child that allocates from the pool, say a torch
// DataLoader worker forked from a process using stoker, would hang). So fork waits until no thread holds any
// pool's mutex: the prepare handler takes them all, and both sides release them after. They are held only
// around a few container operations, never while waiting on anything else.
std::mutex& registry_mutex() {
  static auto* m = new std::mutex;  // never destroyed: pools may be freed during static destruction
  return *m;
}

std::vector<std::mutex*>& registry() {
  static auto* r = new std::vector<std::mutex*>;
  return *r;
}

void lock_all_for_fork() {
  registry_mutex().lock();
  for (std::mutex* m : registry()) m->lock();
}

void unlock_all_after_fork() {
  auto& r = registry();
  for (auto it = r.rbegin(); it != r.rend(); ++it) (*it)->unlock();
  registry_mutex().unlock();
}

}  // namespace

namespace detail {

void register_for_fork(std::mutex* m) {
  static std::once_flag installed;
  std::call_once(installed, [] { pthread_atfork(lock_all_for_fork, unlock_all_after_fork, unlock_all_after_fork); });
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().push_back(m);
}

void unregister_for_fork(std::mutex* m) noexcept {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& r = registry();
  for (auto it = r.begin(); it != r.end(); ++it) {
    if (*it == m) {
      r.erase(it);
      return;
    }
  }
}

}  // namespace detail

using detail::register_for_fork;
using detail::unregister_for_fork;

struct BufferPool::State {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;  // exact size -> cached blocks
  size_t max_cached = 0;
  size_t grow_to = 0;
  PoolStats stats;
  std::shared_ptr<cuda::PrimaryContext> pin;  // set: blocks come from cuMemHostAlloc in this context
  std::shared_ptr<FenceQueue> fence;          // set: returned blocks wait there first (under mu)

  State() { register_for_fork(&mu); }

  ~State() {
    unregister_for_fork(&mu);
    for (auto& [size, list] : free)
      for (void* p : list) release(p);
  }

  // The peak of bytes out at once is kept over two windows (see forget_peak): the current one and the one
  // before; the peak is the larger.
  int64_t window_peak = 0;
  int64_t earlier_peak = 0;

  int64_t peak() const { return std::max(window_peak, earlier_peak); }

  // What the cache may hold now (under mu): max_cached, raised to the peak handed out at once up to grow_to.
  size_t bound() const { return std::max(max_cached, std::min(static_cast<size_t>(peak()), grow_to)); }

  void* allocate(size_t size) { return pin ? cuda::alloc_pinned(*pin, size) : std::aligned_alloc(64, size); }

  // The peak of bytes out at once, with the block just counted (under mu).
  void note_peak() { window_peak = std::max(window_peak, stats.outstanding_bytes); }

  // A new window of the peak begins, with the bytes out now (`keep_earlier`: the one ending still counts
  // through it), and the cached blocks past the bound that leaves are freed.
  void new_window(bool keep_earlier) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu);
      earlier_peak = keep_earlier ? window_peak : 0;
      window_peak = stats.outstanding_bytes;
      const size_t limit = bound();
      for (auto& [size, list] : free) {
        while (!list.empty() && static_cast<size_t>(stats.cached_bytes) > limit) {
          drop.push_back(list.back());
          list.pop_back();
          stats.cached_bytes -= static_cast<int64_t>(size);
          if (pin) stats.pinned_bytes -= static_cast<int64_t>(size);
        }
      }
    }
    for (void* p : drop) release(p);  // outside the lock: unpinning can take milliseconds
  }

  // Undoes acquire's count of a block whose allocation failed (never counted in the peak).
  void not_allocated(size_t size) {
    std::lock_guard<std::mutex> lock(mu);
    --stats.outstanding;
    stats.outstanding_bytes -= static_cast<int64_t>(size);
  }

  // Frees a block's memory; never throws (a failed cuMemFreeHost can only be dropped, see driver.h).
  void release(void* p) noexcept {
    if (pin)
      cuda::free_pinned(*pin, p);
    else
      std::free(p);
  }

  // Caches a returned block. When the cache is full, blocks of other sizes make room (the sizes in use now
  // are those being returned: a cache filled with an earlier shape's blocks would otherwise never serve the
  // new shape); a block is freed when blocks of its own size already fill the cache.
  void give_back(void* p, size_t bytes) {
    std::vector<std::pair<void*, size_t>> freed;  // evicted blocks, and this one when it is not cached
    {
      std::lock_guard<std::mutex> lock(mu);
      --stats.outstanding;
      stats.outstanding_bytes -= static_cast<int64_t>(bytes);
      const size_t limit = bound();
      auto& same = free[bytes];
      if ((same.size() + 1) * bytes <= limit) {
        for (auto it = free.begin(); it != free.end() && static_cast<size_t>(stats.cached_bytes) + bytes > limit;
             ++it) {
          if (it->first == bytes) continue;
          while (!it->second.empty() && static_cast<size_t>(stats.cached_bytes) + bytes > limit) {
            freed.emplace_back(it->second.back(), it->first);
            it->second.pop_back();
            stats.cached_bytes -= static_cast<int64_t>(it->first);
          }
        }
        same.push_back(p);
        stats.cached_bytes += static_cast<int64_t>(bytes);
      } else {
        freed.emplace_back(p, bytes);
      }
      if (pin)
        for (const auto& f : freed) stats.pinned_bytes -= static_cast<int64_t>(f.second);
    }
    for (const auto& f : freed) release(f.first);  // outside the lock: unpinning can take milliseconds
  }
};

size_t pinned_size_class(size_t bytes) {
  constexpr size_t kPage = 4096;
  if (bytes <= 64 * 1024) return bytes == 0 ? kPage : (bytes + kPage - 1) / kPage * kPage;
  const int top = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));  // floor(log2(bytes))
  const size_t step = size_t{1} << (top - 3);
  return (bytes + step - 1) / step * step;
}

BufferPool::BufferPool(size_t max_cached_bytes) : state_(std::make_shared<State>()) {
  state_->max_cached = max_cached_bytes;
}

BufferPool::BufferPool(size_t max_cached_bytes, std::shared_ptr<cuda::PrimaryContext> ctx)
    : BufferPool(max_cached_bytes) {
  state_->pin = std::move(ctx);
}

BufferPool::~BufferPool() = default;

std::shared_ptr<Block> BufferPool::acquire(size_t bytes) {
  constexpr size_t kAlign = 64;
  const size_t size = state_->pin ? pinned_size_class(bytes)
                                  : (bytes == 0 ? kAlign : (bytes + kAlign - 1) / kAlign * kAlign);
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
    state_->stats.outstanding_bytes += static_cast<int64_t>(size);
    if (p != nullptr) state_->note_peak();  // a block allocated below counts once it exists
  }
  if (p == nullptr) {
    try {
      p = state_->allocate(size);  // outside the lock: page-locking can take milliseconds
    } catch (...) {
      state_->not_allocated(size);
      throw;
    }
    if (p == nullptr) {
      state_->not_allocated(size);
      throw std::bad_alloc();
    }
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->note_peak();
    if (state_->pin) state_->stats.pinned_bytes += static_cast<int64_t>(size);
  }
  auto* block = new Block{p, size, state_->pin != nullptr};
  std::shared_ptr<State> state = state_;
  return std::shared_ptr<Block>(block, [state](Block* b) {
    std::shared_ptr<FenceQueue> fence;
    if (state->pin) {  // only page-locked blocks are fenced
      std::lock_guard<std::mutex> lock(state->mu);
      fence = state->fence;
    }
    void* data = b->data;
    const size_t bytes = b->bytes;
    delete b;
    if (fence)
      fence->park([state, data, bytes] { state->give_back(data, bytes); });
    else
      state->give_back(data, bytes);
  });
}

PoolStats BufferPool::stats() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  PoolStats s = state_->stats;
  s.peak_outstanding_bytes = state_->peak();
  s.cache_bound = static_cast<int64_t>(state_->bound());
  return s;
}

void BufferPool::forget_peak() {
  // The window ending still counts through the next, so epochs alike keep their blocks, and a peak reached
  // once (a user keeping a list of batches) is forgotten a window later.
  state_->new_window(true);
}

void BufferPool::set_growth(size_t grow_to) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->grow_to = grow_to;
}

bool BufferPool::pinned() const { return state_->pin != nullptr; }

void BufferPool::set_fence(std::shared_ptr<FenceQueue> fence) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->fence = std::move(fence);
}

void BufferPool::set_max_cached_bytes(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->max_cached = bytes;
  }
  state_->new_window(false);  // the peak counts from now
}

}  // namespace stoker
