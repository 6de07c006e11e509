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
}

std::unique_ptr<cuda::Event> FenceQueue::spare_event(int device) {
  auto& spare = spare_[device];
  if (spare.empty()) return std::make_unique<cuda::Event>(cuda::primary_context(device));
  auto event = std::move(spare.back());
  spare.pop_back();
  return event;
}

void FenceQueue::stamp(const Streams& streams) {
  if (::getpid() != owner_) return;
  std::lock_guard<std::mutex> driver(driver_mu_);  // driver calls: never under mu_ (which fork takes)
  Releases releases;
  {
    std::lock_guard<std::mutex> lock(mu_);
    releases.swap(unstamped_);
  }
  if (releases.empty()) return;
  Events events;
  try {
    for (const auto& [device, stream] : streams) {
      events.push_back(spare_event(device));
      events.back()->record(stream);
    }
  } catch (...) {  // the releases stay parked, unstamped, for a later call
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& r : unstamped_) releases.push_back(std::move(r));
    unstamped_.swap(releases);
    throw;
  }
  std::lock_guard<std::mutex> lock(mu_);
  stamped_.emplace_back(std::move(events), std::move(releases));
}

void FenceQueue::poll() {
  std::exception_ptr failure;
  Releases run = finished(&failure);
  for (auto& r : run) r();  // outside the locks: a release takes its pool's or ring's mutex
  if (failure) std::rethrow_exception(failure);
}

FenceQueue::Releases FenceQueue::finished(std::exception_ptr* failure) {
  Releases run;
  if (::getpid() != owner_) return run;
  {
    std::lock_guard<std::mutex> driver(driver_mu_);
    for (;;) {
      Events* oldest;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stamped_.empty()) break;
        oldest = &stamped_.front().first;  // stamped_ changes only under driver_mu_, held here
      }
      // Stamps complete in order on one stream, not always across streams; the oldest is waited for first (a
      // later one that is done only waits longer).
      bool done = true;
      try {
        for (const auto& event : *oldest) {
          if (!event->query()) {
            done = false;
            break;
          }
        }
      } catch (...) {
        *failure = std::current_exception();
        break;
      }
      if (!done) break;
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& r : stamped_.front().second) run.push_back(std::move(r));
      for (auto& event : stamped_.front().first) {
        const int device = event->context()->ordinal();
        spare_[device].push_back(std::move(event));
      }
      stamped_.pop_front();
    }
  }
  return run;
}

size_t FenceQueue::parked() const {
  std::lock_guard<std::mutex> lock(mu_);  // (a stamp in progress holds its releases outside: not counted)
  size_t n = unstamped_.size();
  for (const auto& [events, releases] : stamped_) n += releases.size();
  return n;
}

}  // namespace stoker
