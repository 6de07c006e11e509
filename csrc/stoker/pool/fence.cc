#include "stoker/pool/fence.h"

#include <unistd.h>

#include "stoker/pool/buffer_pool.h"

namespace stoker {

FenceQueue::FenceQueue(std::shared_ptr<cuda::PrimaryContext> ctx) : ctx_(std::move(ctx)), owner_(::getpid()) {
  detail::register_for_fork(&mu_);
}

FenceQueue::~FenceQueue() {
  // Only reached once nothing can park here any more (every pool and ring given this queue holds it); what is
  // still parked then belongs to memory nobody can reuse, so it is dropped with the queue.
  detail::unregister_for_fork(&mu_);
}

void FenceQueue::park(std::function<void()> release) {
  if (::getpid() != owner_) {  // a forked child: no GPU work of this process can read it
    release();
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  unstamped_.push_back(std::move(release));
  ++parked_;
}

void FenceQueue::stamp(cuda::CUstream stream) {
  if (::getpid() != owner_) return;
  {
    std::lock_guard<std::mutex> driver(driver_mu_);  // driver calls: never under mu_ (which fork takes)
    Releases releases;
    std::unique_ptr<cuda::Event> event;
    {
      std::lock_guard<std::mutex> lock(mu_);
      releases.swap(unstamped_);
      if (!releases.empty() && !spare_.empty()) {
        event = std::move(spare_.back());
        spare_.pop_back();
      }
    }
    if (!releases.empty()) {
      try {
        if (!event) event = std::make_unique<cuda::Event>(ctx_);
        event->record(stream);
      } catch (...) {  // the releases stay parked, unstamped, for a later call
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& r : unstamped_) releases.push_back(std::move(r));
        unstamped_.swap(releases);
        throw;
      }
      std::lock_guard<std::mutex> lock(mu_);
      stamped_.emplace_back(std::move(event), std::move(releases));
    }
  }
  poll();
}

void FenceQueue::poll() {
  if (::getpid() != owner_) return;
  Releases run;
  std::exception_ptr failure;
  {
    std::lock_guard<std::mutex> driver(driver_mu_);
    for (;;) {
      cuda::Event* oldest;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stamped_.empty()) break;
        oldest = stamped_.front().first.get();  // stamped_ changes only under driver_mu_, held here
      }
      // Events of different streams may complete out of order; the oldest is waited for first (a later one is
      // released at a later call: it only waits longer).
      bool done;
      try {
        done = oldest->query();
      } catch (...) {
        failure = std::current_exception();
        break;
      }
      if (!done) break;
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& r : stamped_.front().second) run.push_back(std::move(r));
      spare_.push_back(std::move(stamped_.front().first));
      stamped_.pop_front();
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    parked_ = unstamped_.size();
    for (const auto& [event, releases] : stamped_) parked_ += releases.size();
  }
  for (auto& r : run) r();  // outside the locks: a release takes its pool's or ring's mutex
  if (failure) std::rethrow_exception(failure);
}

size_t FenceQueue::parked() const {
  std::lock_guard<std::mutex> lock(mu_);
  return parked_;
}

}  // namespace stoker
