// Host memory handed to the user pinned may still be read by a copy the user queued on the GPU.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "stoker/cuda/driver.h"

namespace stoker {

/// Holds back the return of page-locked memory to its pool or ring until the GPU has passed the point where it
/// was released. Batches handed over pinned (pin_memory=True) are often copied with x.cuda(non_blocking=True)
/// and dropped at once; torch tracks such copies only from its own host allocator's memory, so without this the
/// memory could be refilled with a later batch while the copy still waits behind the GPU's earlier work.
///
/// A pool or ring given a queue parks each release here (any thread, any time: a tensor's deleter). stamp()
/// records an event on each stream given (torch's current stream of every GPU the process has work on: the
/// user's copy may go to any of them) for everything parked so far; finished() hands over the releases whose
/// events have all completed, and poll() runs them. Nothing is lost: the memory of a release is held, never freed
/// behind the pool's back. In a forked child (no CUDA) a release runs at once.
class FenceQueue {
 public:
  /// (device ordinal, stream handle)
  using Streams = std::vector<std::pair<int, cuda::CUstream>>;

  explicit FenceQueue(std::shared_ptr<cuda::PrimaryContext> ctx);
  ~FenceQueue();
  FenceQueue(const FenceQueue&) = delete;
  FenceQueue& operator=(const FenceQueue&) = delete;

  using Releases = std::vector<std::function<void()>>;

  void park(std::function<void()> release);
  /// Records the events (no release runs). Throws CudaError when the driver refuses one (the releases stay
  /// parked, unstamped).
  void stamp(const Streams& streams);
  /// Takes the releases whose events have all completed, for the caller to run (outside any lock: they return
  /// memory to pools and rings, which can free it). A query that fails stops there; its error is put in
  /// `failure` for the caller to raise after running what it got.
  Releases finished(std::exception_ptr* failure);
  /// finished(), then runs them; rethrows a query's failure after.
  void poll();
  /// Releases parked and not yet run, stamped or not.
  size_t parked() const;
  /// The device of the pool the queue was made for.
  int device() const { return ctx_->ordinal(); }

 private:
  using Events = std::vector<std::unique_ptr<cuda::Event>>;
  std::unique_ptr<cuda::Event> spare_event(int device);  // under driver_mu_

  std::shared_ptr<cuda::PrimaryContext> ctx_;
  pid_t owner_;
  mutable std::mutex mu_;  // the containers (registered for fork: taken by deleters on any thread)
  std::mutex driver_mu_;  // serialises stamp and poll, whose driver calls are made outside mu_
  Releases unstamped_;
  std::deque<std::pair<Events, Releases>> stamped_;  // oldest first
  std::map<int, Events> spare_;  // device -> events whose stamp has passed (under driver_mu_)
};

}  // namespace stoker
