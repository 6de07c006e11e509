// The shared-memory ring of process workers: one file mapping, cut into equal slots. A worker writes a batch
// into the slot the main process lent it; the main process wraps the slot as tensors without copying, and the
// slot is lent again only once every tensor viewing it has been freed.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace stoker {

class FenceQueue;

namespace cuda {
class HostRegistration;
class PrimaryContext;
}  // namespace cuda

/// The main process's view of the ring: the mapping, and which slots are lent out.
class SlotRing : public std::enable_shared_from_this<SlotRing> {
 public:
  /// Maps `slots` slots of `slot_bytes` bytes from the file at `path` (which must be that large).
  SlotRing(const std::string& path, size_t slot_bytes, int slots);
  ~SlotRing();
  SlotRing(const SlotRing&) = delete;
  SlotRing& operator=(const SlotRing&) = delete;

  /// A free slot, now lent out, or -1 when every slot is lent.
  int acquire();
  /// Returns a slot (from any thread, without the GIL); through the fence when one is set and `fenced` (a
  /// slot whose batch never reached the user needs none).
  void release(int slot, bool fenced = true);
  /// The pool is done with the ring (its workers are gone): the memory of every slot not lent now is given back
  /// to the file system at once (a hole punched over it; page-locked slots are unlocked first), and each lent
  /// slot's as it returns. A batch kept after its epoch then holds the pages of its own slot, not of the whole
  /// ring. No slot is lent after it (acquire gives -1). Idempotent.
  void retire();
  /// From now on a released slot goes back through `fence` (see FenceQueue) before it can be lent again.
  void set_fence(std::shared_ptr<FenceQueue> fence);
  int free_slots() const;
  int slots() const { return slots_; }
  size_t slot_bytes() const { return slot_bytes_; }
  uint8_t* slot_data(int slot) const { return base_ + static_cast<size_t>(slot) * slot_bytes_; }
  /// From now on each slot is page-locked (cuMemHostRegister, portable) in `ctx` as far as its batches reach,
  /// when it is leased (pin_slot), so tensors over it are pinned in this process; later calls do nothing. The
  /// ring locks what its batches use, not its whole mapping: 1 MiB batches in 32 MiB slots lock about 1 MiB a
  /// slot. Undone before the mapping goes.
  void pin(std::shared_ptr<cuda::PrimaryContext> ctx);
  /// Page-locks bytes [0, bytes) of a lent slot, at least, if the ring is pinned: what the slot has locked
  /// grows in size classes (see pinned_size_class) up to the slot, re-registered whole while the slot is lent
  /// (no copy reads it: a slot returns only once the GPU has passed its release). Registering commits the
  /// range's pages of the (sparse) file: they are reserved first (fallocate), so a file system without the
  /// room fails here, before any page is locked. Never throws: a failure (no room, the driver refusing) stops
  /// the ring's page-locking (what is locked stays so), and pin_error() says why. Whether the range is locked.
  bool pin_slot(int slot, size_t bytes);
  /// Why page-locking stopped ("" while it goes on, or was never asked for).
  std::string pin_error() const;
  /// Bytes page-locked now, over all slots.
  size_t pinned_bytes() const;
  bool pinned() const;

 private:
  uint8_t* base_ = nullptr;
  int fd_ = -1;  // the ring's file, open while it is mapped
  std::string path_;
  size_t slot_bytes_;
  int slots_;
  void release_now(int slot);
  void discard(int slot);  // gives back the slot's pages (not under mu_: a syscall, and pin_mu_ is taken)

  // Page-locking, under pin_mu_ (registering takes milliseconds: never under mu_, which releases wait on).
  mutable std::mutex pin_mu_;
  std::shared_ptr<cuda::PrimaryContext> pin_ctx_;                   // set while slots are page-locked
  std::vector<std::unique_ptr<cuda::HostRegistration>> registered_;  // per slot: its locked prefix, if any
  std::string pin_error_;

  mutable std::mutex mu_;
  std::vector<char> lent_;
  bool retired_ = false;                 // under mu_
  std::shared_ptr<FenceQueue> fence_;  // under mu_
};

/// Ownership of one lent slot: the slot returns to the ring when the last holder (a tensor) lets go.
struct SlotLease {
  SlotLease(std::shared_ptr<SlotRing> r, int s) : ring(std::move(r)), slot(s) {}
  SlotLease(const SlotLease&) = delete;  // exactly one owner releases the slot
  SlotLease& operator=(const SlotLease&) = delete;
  ~SlotLease() { ring->release(slot); }

  std::shared_ptr<SlotRing> ring;
  int slot;
};

}  // namespace stoker
