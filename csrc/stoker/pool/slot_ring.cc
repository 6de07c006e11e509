#include "stoker/pool/slot_ring.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "stoker/common/check.h"
#include "stoker/cuda/driver.h"
#include "stoker/pool/fence.h"

namespace stoker {

SlotRing::SlotRing(const std::string& path, size_t slot_bytes, int slots)
    : slot_bytes_(slot_bytes), slots_(slots), lent_(static_cast<size_t>(slots > 0 ? slots : 0), 0) {
  STOKER_CHECK_AS(ValueError, slots > 0 && slot_bytes > 0 && slot_bytes % 64 == 0,
                  "a ring needs slots > 0 and a slot size that is a positive multiple of 64, got ", slots, " x ",
                  slot_bytes);
  const size_t bytes = slot_bytes * static_cast<size_t>(slots);
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) throw ValueError(detail::concat("cannot open the worker ring ", path, ": ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < bytes) {
    ::close(fd);
    throw ValueError(detail::concat("the worker ring ", path, " is smaller than ", bytes, " bytes"));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw ValueError(detail::concat("cannot map the worker ring ", path, ": ", std::strerror(err)));
  base_ = static_cast<uint8_t*>(p);
}

SlotRing::~SlotRing() {
  registration_.reset();  // unregister while the pages are still mapped
  if (base_) ::munmap(base_, slot_bytes_ * static_cast<size_t>(slots_));
}

void SlotRing::pin(std::shared_ptr<cuda::PrimaryContext> ctx) {
  std::lock_guard<std::mutex> lock(mu_);
  if (registration_) return;
  registration_ = std::make_unique<cuda::HostRegistration>(std::move(ctx), base_,
                                                           slot_bytes_ * static_cast<size_t>(slots_));
}

bool SlotRing::pinned() const {
  std::lock_guard<std::mutex> lock(mu_);
  return registration_ != nullptr;
}

int SlotRing::acquire() {
  std::lock_guard<std::mutex> lock(mu_);
  for (int s = 0; s < slots_; ++s) {
    if (!lent_[s]) {
      lent_[s] = 1;
      return s;
    }
  }
  return -1;
}

void SlotRing::release(int slot, bool fenced) {
  std::shared_ptr<FenceQueue> fence;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (fenced) fence = fence_;
    if (!fence) {
      if (slot >= 0 && slot < slots_) lent_[slot] = 0;
      return;
    }
  }
  fence->park([ring = shared_from_this(), slot] { ring->release_now(slot); });
}

void SlotRing::release_now(int slot) {
  std::lock_guard<std::mutex> lock(mu_);
  if (slot >= 0 && slot < slots_) lent_[slot] = 0;
}

void SlotRing::set_fence(std::shared_ptr<FenceQueue> fence) {
  std::lock_guard<std::mutex> lock(mu_);
  fence_ = std::move(fence);
}

int SlotRing::free_slots() const {
  std::lock_guard<std::mutex> lock(mu_);
  int n = 0;
  for (char l : lent_) n += !l;
  return n;
}

}  // namespace stoker
