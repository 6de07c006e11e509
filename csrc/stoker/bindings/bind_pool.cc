#include "stoker/bindings/bindings.h"
#include "stoker/common/check.h"
#include "stoker/pool/buffer_pool.h"

namespace stoker::bindings {

void register_pool(py::module_& m) {
  py::class_<BufferPool, std::shared_ptr<BufferPool>>(m, "BufferPool")
      .def(py::init<size_t>(), py::arg("max_cached_bytes"))
      .def("stats", [](const BufferPool& p) {
        const PoolStats s = p.stats();
        py::dict d;
        d["allocations"] = s.allocations;
        d["reuses"] = s.reuses;
        d["outstanding"] = s.outstanding;
        d["cached_bytes"] = s.cached_bytes;
        return d;
      })
      .def("set_max_cached_bytes", &BufferPool::set_max_cached_bytes, py::arg("bytes"))
      .def("empty", [](BufferPool& p, std::vector<int64_t> shape, int code, int bits) {
        // An uninitialised pooled buffer as a dltensor capsule (for torch ops writing with out=).
        DType t{static_cast<DTypeCode>(code), static_cast<uint8_t>(bits)};
        STOKER_CHECK_AS(TypeError, dtype_supported(t), "unsupported element type (", code, ", ", bits, ")");
        size_t numel = 1;
        for (int64_t d : shape) {
          STOKER_CHECK_AS(ValueError, d >= 0, "negative dimension ", d);
          numel *= static_cast<size_t>(d);
        }
        std::shared_ptr<Block> block = p.acquire(numel * t.itemsize());
        void* data = block->data;
        return to_capsule(export_dlpack(std::move(block), data, t, shape));
      }, py::arg("shape"), py::arg("code"), py::arg("bits"));
}

}  // namespace stoker::bindings
