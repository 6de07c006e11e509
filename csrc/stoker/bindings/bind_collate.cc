#include "stoker/bindings/bindings.h"
#include "stoker/collate/stack.h"
#include "stoker/common/check.h"
#include "stoker/pool/buffer_pool.h"

namespace stoker::bindings {

void register_collate(py::module_& m) {
  // Stacks a list of numpy arrays of one shape and dtype into a pooled buffer; returns a dltensor capsule
  // of shape [len(arrays), *shape], or None when the batch is not that regular (the caller then uses
  // torch's own collate, which gives torch's result or torch's error).
  m.def("stack_arrays", [](const py::list& arrays, BufferPool& pool) -> py::object {
    const size_t count = arrays.size();
    if (count == 0) return py::none();
    std::vector<StridedView> views(count);
    std::vector<int64_t> shape;
    py::dtype first_dtype;
    DType dtype;
    for (size_t i = 0; i < count; ++i) {
      py::handle h = arrays[i];
      if (!py::isinstance<py::array>(h)) return py::none();
      auto a = py::reinterpret_borrow<py::array>(h);
      const auto ndim = static_cast<size_t>(a.ndim());
      if (i == 0) {
        auto t = dtype_of(a.dtype());
        if (!t) return py::none();
        dtype = *t;
        first_dtype = a.dtype();
        shape.assign(a.shape(), a.shape() + ndim);
      } else {
        if (ndim != shape.size() || !std::equal(shape.begin(), shape.end(), a.shape())) return py::none();
        if (!a.dtype().equal(first_dtype)) return py::none();
      }
      views[i].data = static_cast<const uint8_t*>(a.data());
      views[i].strides.assign(a.strides(), a.strides() + ndim);
      for (size_t d = 0; d < ndim; ++d)
        if (views[i].strides[d] < 0) return py::none();
    }
    size_t numel = 1;
    for (int64_t d : shape) numel *= static_cast<size_t>(d);
    std::shared_ptr<Block> block;
    {
      py::gil_scoped_release release;  // a page-locked pool may call the driver to allocate
      block = pool.acquire(count * numel * dtype.itemsize());
      stack_views(views, shape, dtype.itemsize(), static_cast<uint8_t*>(block->data));
    }
    std::vector<int64_t> out_shape{static_cast<int64_t>(count)};
    out_shape.insert(out_shape.end(), shape.begin(), shape.end());
    void* data = block->data;
    return to_capsule(export_dlpack(std::move(block), data, dtype, out_shape));
  }, py::arg("arrays"), py::arg("pool"));
}

}  // namespace stoker::bindings
