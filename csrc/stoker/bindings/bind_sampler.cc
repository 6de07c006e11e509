#include "stoker/bindings/bindings.h"
#include "stoker/sampler/index_stream.h"

namespace stoker::bindings {

void register_sampler(py::module_& m) {
  py::class_<IndexStream>(m, "IndexStream")
      .def(py::init<int64_t, int64_t, bool, bool, uint64_t, uint64_t>(), py::arg("n"),
           py::arg("batch_size"), py::arg("drop_last"), py::arg("shuffle"), py::arg("seed"),
           py::arg("epoch"))
      .def_property_readonly("num_batches", &IndexStream::num_batches)
      .def("__len__", &IndexStream::num_batches)
      .def("batch", [](const IndexStream& s, int64_t b) {
        const int64_t len = s.batch_len(b);
        py::array_t<int64_t> out(len);
        int64_t* data = out.mutable_data();
        {
          py::gil_scoped_release release;
          s.batch_indices(b, data);
        }
        return out;
      }, py::arg("b"));
}

}  // namespace stoker::bindings
