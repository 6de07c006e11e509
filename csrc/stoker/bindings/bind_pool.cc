#include "stoker/bindings/bindings.h"
#include "stoker/common/check.h"
#include "stoker/cuda/driver.h"
#include "stoker/pool/buffer_pool.h"
#include "stoker/pool/fence.h"
#include "stoker/pool/slot_ring.h"

namespace stoker::bindings {

namespace {

// Runs the fence queue's finished releases without the GIL, then raises a failed query's error.
void run_finished(FenceQueue& q) {
  std::exception_ptr failure;
  FenceQueue::Releases run = q.finished(&failure);
  if (!run.empty()) {
    ReleaseGil release;
    for (auto& r : run) r();
    run.clear();  // the closures (holding pools and rings) go without the GIL too
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

void register_pool(py::module_& m) {
  py::class_<FenceQueue, std::shared_ptr<FenceQueue>>(m, "FenceQueue",
      "Holds back the return of page-locked memory released by the user until the GPU has passed that point.")
      .def(py::init([](int device) {
             ReleaseGil release;  // (inside the factory: pybind11 registers the new instance with the GIL)
             return std::make_shared<FenceQueue>(cuda::primary_context(device));
           }),
           py::arg("device"))
      // The events are recorded and queried with the GIL held (a few non-blocking driver calls, cheaper than a
      // GIL hand-off); the releases run without it (returning memory can free it, or unregister a ring).
      .def("stamp", [](FenceQueue& q, const std::vector<std::pair<int, uintptr_t>>& streams) {
             FenceQueue::Streams s;
             for (const auto& [device, handle] : streams)
               s.emplace_back(device, reinterpret_cast<cuda::CUstream>(handle));
             q.stamp(s);
             run_finished(q);
           }, py::arg("streams"),
           "Records an event on each (device, stream handle) given (torch's current streams) for everything parked "
           "so far, then returns the memory whose events have all completed.")
      .def("poll", [](FenceQueue& q) { run_finished(q); }, "Returns the memory whose events have all completed.")
      .def_property_readonly("parked", &FenceQueue::parked, "Releases held back, stamped or not.")
      .def_property_readonly("device", &FenceQueue::device);

  py::class_<BufferPool, std::shared_ptr<BufferPool>>(m, "BufferPool")
      .def(py::init([](size_t max_cached_bytes, std::optional<int> pin_device, size_t grow_to) {
             ReleaseGil release;  // (inside the factory: pybind11 registers the new instance with the GIL)
             auto pool = pin_device ? std::make_shared<BufferPool>(max_cached_bytes, cuda::primary_context(*pin_device))
                                    : std::make_shared<BufferPool>(max_cached_bytes);
             pool->set_growth(grow_to);
             return pool;
           }),
           py::arg("max_cached_bytes"), py::arg("pin_device") = py::none(), py::arg("grow_to") = 0,
           "With pin_device, blocks are page-locked (cuMemHostAlloc) once, in that device's primary context. The "
           "cache's bound follows the most bytes handed out at once, up to grow_to (0: fixed at max_cached_bytes).")
      .def_property_readonly("pinned", &BufferPool::pinned)
      .def("stats", [](const BufferPool& p) {
        const PoolStats s = p.stats();
        py::dict d;
        d["allocations"] = s.allocations;
        d["reuses"] = s.reuses;
        d["outstanding"] = s.outstanding;
        d["cached_bytes"] = s.cached_bytes;
        d["pinned_bytes"] = s.pinned_bytes;
        d["outstanding_bytes"] = s.outstanding_bytes;
        d["peak_outstanding_bytes"] = s.peak_outstanding_bytes;
        d["cache_bound"] = s.cache_bound;
        return d;
      })
      .def("set_max_cached_bytes", &BufferPool::set_max_cached_bytes, py::arg("bytes"))
      .def("set_growth", &BufferPool::set_growth, py::arg("grow_to"),
           "The cache's bound follows the most bytes handed out at once, up to grow_to (0: fixed).")
      .def("forget_peak", &BufferPool::forget_peak, py::call_guard<ReleaseGil>(),
           "The peak counts again from the bytes out now; cached blocks past the bound are freed.")
      .def("set_fence", &BufferPool::set_fence, py::arg("fence").none(true),
           "Blocks returned from now on go back through the fence queue (None: straight to the cache).")
      .def("empty", [](BufferPool& p, std::vector<int64_t> shape, int code, int bits) {
        // An uninitialised pooled buffer as a dltensor capsule (for torch ops writing with out=).
        DType t{static_cast<DTypeCode>(code), static_cast<uint8_t>(bits)};
        STOKER_CHECK_AS(TypeError, dtype_supported(t), "unsupported element type (", code, ", ", bits, ")");
        size_t numel = 1;
        for (int64_t d : shape) {
          STOKER_CHECK_AS(ValueError, d >= 0, "negative dimension ", d);
          numel *= static_cast<size_t>(d);
        }
        std::shared_ptr<Block> block;
        {
          ReleaseGil release;  // a page-locked pool may call the driver (milliseconds)
          block = p.acquire(numel * t.itemsize());
        }
        void* data = block->data;
        return to_capsule(export_dlpack(std::move(block), data, t, shape));
      }, py::arg("shape"), py::arg("code"), py::arg("bits"));

  py::class_<SlotLease, std::shared_ptr<SlotLease>>(m, "SlotLease")
      .def_property_readonly("slot", [](const SlotLease& l) { return l.slot; })
      .def("tensor", [](std::shared_ptr<SlotLease> lease, size_t offset, std::vector<int64_t> shape, int code,
                        int bits) {
        // A tensor over bytes [offset, offset + numel * itemsize) of the slot, keeping the lease alive.
        DType t{static_cast<DTypeCode>(code), static_cast<uint8_t>(bits)};
        STOKER_CHECK_AS(TypeError, dtype_supported(t), "unsupported element type (", code, ", ", bits, ")");
        size_t bytes = t.itemsize();
        for (int64_t d : shape) {
          STOKER_CHECK_AS(ValueError, d >= 0, "negative dimension ", d);
          bytes *= static_cast<size_t>(d);
        }
        STOKER_CHECK_AS(ValueError, offset % 64 == 0 && offset + bytes <= lease->ring->slot_bytes(),
                        "tensor of ", bytes, " bytes at offset ", offset, " does not fit a slot of ",
                        lease->ring->slot_bytes(), " bytes");
        void* data = lease->ring->slot_data(lease->slot) + offset;
        return to_capsule(export_dlpack(lease, data, t, shape));
      }, py::arg("offset"), py::arg("shape"), py::arg("code"), py::arg("bits"));

  py::class_<SlotRing, std::shared_ptr<SlotRing>>(m, "SlotRing")
      .def(py::init<const std::string&, size_t, int>(), py::arg("path"), py::arg("slot_bytes"), py::arg("slots"))
      .def("acquire", &SlotRing::acquire)
      .def("retire", &SlotRing::retire, py::call_guard<ReleaseGil>(),
           "The pool is done with the ring: free slots give back their memory now, lent ones as they return.")
      .def("release", &SlotRing::release, py::arg("slot"), py::arg("fenced") = true,
           "Returns a slot; through the fence queue (when set) unless fenced=False: a batch the user never got.")
      .def_property_readonly("free_slots", &SlotRing::free_slots)
      .def_property_readonly("slots", &SlotRing::slots)
      .def_property_readonly("slot_bytes", &SlotRing::slot_bytes)
      .def_property_readonly("pinned", &SlotRing::pinned)
      .def("set_fence", &SlotRing::set_fence, py::arg("fence").none(true),
           "Slots released from now on go back through the fence queue before they are lent again.")
      .def("pin", [](SlotRing& ring, int device) { ring.pin(cuda::primary_context(device)); }, py::arg("device"),
           py::call_guard<ReleaseGil>(),
           "From now on each slot is page-locked (cuMemHostRegister) in the device's primary context as far as its "
           "batches reach, when it is leased.")
      .def_property_readonly("pin_error", &SlotRing::pin_error, "Why page-locking stopped ('' while it goes on).")
      .def_property_readonly("pinned_bytes", &SlotRing::pinned_bytes, "Bytes page-locked now, over all slots.")
      .def("lease", [](std::shared_ptr<SlotRing> ring, int slot, size_t used) {
        STOKER_CHECK_AS(IndexError, slot >= 0 && slot < ring->slots(), "slot ", slot, " out of range");
        auto lease = std::make_shared<SlotLease>(ring, slot);  // first: a lease refused below still returns it
        STOKER_CHECK_AS(ValueError, used <= ring->slot_bytes(), "a batch of ", used, " bytes does not fit a slot of ",
                        ring->slot_bytes(), " bytes");
        if (used > 0) {
          ReleaseGil release;  // page-locking can take milliseconds
          ring->pin_slot(slot, used);
        }
        return lease;
      }, py::arg("slot"), py::arg("used") = 0,
      "Takes over a lent slot whose batch fills its bytes [0, used): it returns to the ring when the lease and its "
      "tensors are gone. A pinned ring page-locks those bytes first (see pin_error when they are not).");
}

}  // namespace stoker::bindings
