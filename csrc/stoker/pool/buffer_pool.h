// Reusable host buffers. A block handed out returns to the pool when its last reference is dropped, from
// any thread; the pool never blocks: with every block held by the user it allocates a new one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace stoker {

/// A block of host memory owned by a pool. Hold it through the shared_ptr acquire() returns.
struct Block {
  void* data = nullptr;
  size_t bytes = 0;
};

/// Counters of a pool's life, for stats() and tests.
struct PoolStats {
  int64_t allocations = 0;  // blocks created by the allocator
  int64_t reuses = 0;       // acquisitions served from the free list
  int64_t outstanding = 0;  // blocks handed out and not yet returned
  int64_t cached_bytes = 0; // bytes waiting in the free list
};

/// A thread-safe pool of 64-byte aligned blocks, kept per exact size. Returned blocks are cached while the
/// cache holds at most `max_cached_bytes`; past that they are freed.
class BufferPool {
 public:
  explicit BufferPool(size_t max_cached_bytes);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  /// A block of at least `bytes` bytes (contents unspecified). Never waits.
  std::shared_ptr<Block> acquire(size_t bytes);
  PoolStats stats() const;
  void set_max_cached_bytes(size_t bytes);

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with every block's deleter, so blocks may outlive the pool
};

}  // namespace stoker
