#include "stoker/pool/fence.h"

#include <unistd.h>

#include "stoker/pool/buffer_pool.h"

namespace stoker {

FenceQueue::FenceQueue(std::shared_ptr<cuda::PrimaryContext> ctx) : ctx_(std::move(ctx)), owner_(::getpid()) {
  detail::register_for_fork(&mu_);
}

FenceQueue::~FenceQueue() {
  detail::unregister_for_fork(&mu_);
  Releases all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    all.swap(unstamped_);
    for (auto& [event, releases] : stamped_)
      for (auto& r : releases) all.push_back(std::move(r));
    stamped_.clear();
  }
  for (auto& r : all) r();
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
    std::lock_guard<std::mutex> lock(mu_);
    if (!unstamped_.empty()) {
      std::unique_ptr<cuda::Event> event;
      if (!spare_.empty()) {
        event = std::move(spare_.back());
        spare_.pop_back();
      } else {
        event = std::make_unique<cuda::Event>(ctx_);
      }
      event->record(stream);  // throws (the releases stay parked, unstamped) when the driver refuses
      Releases releases;
      releases.swap(unstamped_);
      stamped_.emplace_back(std::move(event), std::move(releases));
    }
  }
  poll();
}

void FenceQueue::poll() {
  if (::getpid() != owner_) return;
  Releases run;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Events of different streams may complete out of order; the oldest is waited for first (a later one is
    // then released at a later call: it only waits longer).
    while (!stamped_.empty() && stamped_.front().first->query()) {
      for (auto& r : stamped_.front().second) run.push_back(std::move(r));
      spare_.push_back(std::move(stamped_.front().first));
      stamped_.pop_front();
    }
    parked_ -= run.size();
  }
  for (auto& r : run) r();  // outside the lock: a release takes its pool's or ring's mutex
}

size_t FenceQueue::parked() const {
  std::lock_guard<std::mutex> lock(mu_);
  return parked_;
}

}  // namespace stoker
