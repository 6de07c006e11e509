#include "stoker/bindings/bindings.h"
#include "stoker/sampler/index_stream.h"

namespace stoker::bindings {

void register_sampler(py::module_& m) {
  py::class_<IndexStream>(m, "IndexStream")
      .def(py::init([](int64_t n, int64_t batch_size, bool drop_last, bool shuffle, uint64_t seed,
                       uint64_t epoch, int64_t rank, int64_t world_size) {
             return IndexStream(n, batch_size, drop_last, shuffle, seed, epoch, Shard{rank, world_size});
           }),
           py::arg("n"), py::arg("batch_size"), py::arg("drop_last"), py::arg("shuffle"), py::arg("seed"),
           py::arg("epoch"), py::arg("rank") = 0, py::arg("world_size") = 1)
      .def_property_readonly("num_batches", &IndexStream::num_batches)
      .def_property_readonly("shard_size", &IndexStream::shard_size)
      .def_static("shard_size_for", &IndexStream::shard_size_for, py::arg("n"), py::arg("world_size"),
                  py::arg("drop_last"))
      .def("__len__", &IndexStream::num_batches)
      .def("batch", [](const IndexStream& s, int64_t b) {
        const int64_t len = s.batch_len(b);
        py::array_t<int64_t> out(len);
        int64_t* data = out.mutable_data();
        {
          ReleaseGil release;
          s.batch_indices(b, data);
        }
        return out;
      }, py::arg("b"));
}

}  // namespace stoker::bindings
