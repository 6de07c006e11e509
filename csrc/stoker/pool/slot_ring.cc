#include "stoker/pool/slot_ring.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "stoker/common/check.h"
#include "stoker/cuda/driver.h"
#include "stoker/pool/buffer_pool.h"
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
  if (p == MAP_FAILED) {
    ::close(fd);
    throw ValueError(detail::concat("cannot map the worker ring ", path, ": ", std::strerror(err)));
  }
  base_ = static_cast<uint8_t*>(p);
  fd_ = fd;  // kept: pin() reserves the file's pages through it
  path_ = path;
  // Releases take mu_ on any thread (a tensor's deleter), a forked child's too: fork waits until none holds it.
  // (A leaf: nothing else is locked under it.)
  detail::register_for_fork(&mu_);
}

SlotRing::~SlotRing() {
  detail::unregister_for_fork(&mu_);
  registered_.clear();  // unregister while the pages are still mapped
  if (base_) ::munmap(base_, slot_bytes_ * static_cast<size_t>(slots_));
  if (fd_ >= 0) ::close(fd_);
}

void SlotRing::pin(std::shared_ptr<cuda::PrimaryContext> ctx) {
  std::lock_guard<std::mutex> lock(pin_mu_);
  if (pin_ctx_ || !pin_error_.empty()) return;
  pin_ctx_ = std::move(ctx);
  registered_.resize(static_cast<size_t>(slots_));
}

bool SlotRing::pin_slot(int slot, size_t bytes) {
  std::lock_guard<std::mutex> lock(pin_mu_);
  if (!pin_ctx_ || slot < 0 || slot >= slots_) return false;
  auto& reg = registered_[static_cast<size_t>(slot)];
  if (reg && reg->bytes() >= bytes) return true;
  const size_t want = std::min(slot_bytes_, pinned_size_class(std::max(bytes, reg ? reg->bytes() + 1 : 1)));
  uint8_t* data = slot_data(slot);
  const off_t start = static_cast<off_t>(static_cast<size_t>(slot) * slot_bytes_);
  // Page-locking faults in every page of the range. Reserved first, all at once: on a file system without the
  // room (a container's small /dev/shm) this fails cleanly (tmpfs gives back what it took), where faulting
  // page by page would fill it and leave later writes to the ring (or anyone's shared memory) to die of SIGBUS.
  if (::fallocate(fd_, 0, start, static_cast<off_t>(want)) != 0 && errno != EOPNOTSUPP && errno != ENOSYS) {
    const int err = errno;
    struct statvfs fs {};
    const bool known = ::fstatvfs(fd_, &fs) == 0;
    pin_error_ = detail::concat(
        "page-locking slot ", slot, " of the worker ring (", path_, ") needs ", (want + (1 << 20) - 1) >> 20,
        " MiB of it in memory, and ",
        known ? detail::concat("its file system has ", (fs.f_bavail * fs.f_frsize) >> 20, " MiB free")
              : std::string("its file system's free space is unknown"),
        " (fallocate: ", std::strerror(err), ")");
    pin_ctx_.reset();
    return false;
  }
  reg.reset();  // a range overlapping a registered one cannot be registered: the smaller one goes first
  try {
    reg = std::make_unique<cuda::HostRegistration>(pin_ctx_, data, want);
  } catch (const std::exception& e) {
    pin_error_ = e.what();
    pin_ctx_.reset();
    return false;
  }
  return true;
}

bool SlotRing::pinned() const {
  std::lock_guard<std::mutex> lock(pin_mu_);
  return pin_ctx_ != nullptr;
}

std::string SlotRing::pin_error() const {
  std::lock_guard<std::mutex> lock(pin_mu_);
  return pin_error_;
}

size_t SlotRing::pinned_bytes() const {
  std::lock_guard<std::mutex> lock(pin_mu_);
  size_t total = 0;
  for (const auto& reg : registered_)
    if (reg) total += reg->bytes();
  return total;
}

int SlotRing::acquire() {
  std::lock_guard<std::mutex> lock(mu_);
  if (retired_) return -1;
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
  }
  if (!fence) {
    release_now(slot);
    return;
  }
  fence->park([ring = shared_from_this(), slot] { ring->release_now(slot); });
}

void SlotRing::release_now(int slot) {
  if (slot < 0 || slot >= slots_) return;
  bool retired;
  {
    std::lock_guard<std::mutex> lock(mu_);
    lent_[slot] = 0;
    retired = retired_;
  }
  if (retired) discard(slot);
}

void SlotRing::retire() {
  std::vector<int> free;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (retired_) return;
    retired_ = true;
    for (int s = 0; s < slots_; ++s)
      if (!lent_[s]) free.push_back(s);
  }
  for (int s : free) discard(s);
}

void SlotRing::discard(int slot) {
  {
    // A slot is free only once the GPU has passed its last batch (the fence): nothing reads what is unlocked.
    std::lock_guard<std::mutex> lock(pin_mu_);
    if (static_cast<size_t>(slot) < registered_.size()) registered_[static_cast<size_t>(slot)].reset();
  }
  // tmpfs frees the hole's pages (and unmaps them here). Where punching is not supported the pages stay until
  // the mapping goes, as before: nothing else depends on it.
  (void)::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(static_cast<size_t>(slot) * slot_bytes_), static_cast<off_t>(slot_bytes_));
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
