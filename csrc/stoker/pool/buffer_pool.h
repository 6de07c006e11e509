// Reusable host buffers. A block handed out returns to the pool when its last reference is dropped, from
// any thread; the pool never blocks: with every block held by the user it allocates a new one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

namespace stoker {

class FenceQueue;

namespace cuda {
class PrimaryContext;
}

/// A block of host memory owned by a pool. Hold it through the shared_ptr acquire() returns.
struct Block {
  void* data = nullptr;
  size_t bytes = 0;
  bool pinned = false;  // page-locked: a device copy from it is asynchronous
};

/// Counters of a pool's life, for stats() and tests.
struct PoolStats {
  int64_t allocations = 0;   // blocks created by the allocator
  int64_t reuses = 0;        // acquisitions served from the free list
  int64_t outstanding = 0;   // blocks handed out and not yet returned
  int64_t cached_bytes = 0;  // bytes waiting in the free list
  int64_t pinned_bytes = 0;  // page-locked bytes the pool holds, cached or handed out (0 for a plain pool)
  int64_t outstanding_bytes = 0;       // bytes of the blocks handed out and not yet returned
  int64_t peak_outstanding_bytes = 0;  // the most bytes handed out at once
  int64_t cache_bound = 0;             // what the cache may hold now (see BufferPool)
};

/// A thread-safe pool of 64-byte aligned blocks, kept per exact size. Returned blocks are cached while the
/// cache holds at most its bound: past that, cached blocks of other sizes are freed to make room, and a
/// returned block is freed only when blocks of its own size fill the cache. The bound is `max_cached_bytes`,
/// raised to the most bytes handed out at once (since forget_peak), up to `grow_to` (set_growth): batches too
/// large for the fixed bound, several in flight, would otherwise be allocated (and page-faulted, or
/// page-locked) afresh each time, since the cache could never hold those that return while others are out.
class BufferPool {
 public:
  /// Plain blocks (aligned_alloc), sizes rounded up to 64 bytes.
  explicit BufferPool(size_t max_cached_bytes);
  /// Page-locked blocks: each is allocated with cuMemHostAlloc (portable: pinned for every context) in `ctx`,
  /// once, and stays pinned through every reuse; no page-lock call is made for a block served from the cache.
  /// Sizes are rounded up to classes (pages up to 64 KiB, then eight classes per power of two, at most 1/8
  /// over the request) so batches of varying size reuse blocks instead of page-locking new ones. Allocation
  /// and freeing make `ctx` current on the calling thread for the call only.
  BufferPool(size_t max_cached_bytes, std::shared_ptr<cuda::PrimaryContext> ctx);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  /// A block of at least `bytes` bytes (contents unspecified). Never waits.
  std::shared_ptr<Block> acquire(size_t bytes);
  PoolStats stats() const;
  /// Sets the fixed bound and forgets the peak (it counts again from the bytes out now); cached blocks past
  /// the new bound are freed.
  void set_max_cached_bytes(size_t bytes);
  /// The cache's bound follows the peak of bytes handed out at once up to `grow_to` bytes (0, the default:
  /// it stays max_cached_bytes).
  void set_growth(size_t grow_to);
  /// Begins a new window of the peak (the bytes out now); the window ending still counts through it, then
  /// is forgotten, and cached blocks past the bound that leaves are freed. Called as an iterator begins: a
  /// peak that epochs reach alike stays, one reached once (batches a user kept) goes an epoch later.
  void forget_peak();
  /// Whether this pool's blocks are page-locked.
  bool pinned() const;
  /// From now on a returned block goes back through `fence` (see FenceQueue) instead of straight to the
  /// cache; nullptr stops that for blocks returned later.
  void set_fence(std::shared_ptr<FenceQueue> fence);

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with every block's deleter, so blocks may outlive the pool
};

namespace detail {
/// fork() waits until no thread holds a registered mutex (see buffer_pool.cc): for mutexes taken on threads
/// that free memory (tensor deleters), which a forked child must not inherit locked.
void register_for_fork(std::mutex* m);
void unregister_for_fork(std::mutex* m) noexcept;
}  // namespace detail

/// The size a page-locked pool allocates for a request of `bytes` (see the constructor).
size_t pinned_size_class(size_t bytes);

}  // namespace stoker
