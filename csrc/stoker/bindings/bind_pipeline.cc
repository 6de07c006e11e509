#include "stoker/bindings/bindings.h"
#include "stoker/common/check.h"
#include "stoker/pipeline/array_pipeline.h"

namespace stoker::bindings {
namespace {

// Column description from Python: (name, address, rows, row_stride, row_bytes, code, bits, row_shape).
using ColumnSpec = std::tuple<std::string, uintptr_t, int64_t, int64_t, size_t, int, int, std::vector<int64_t>>;

std::shared_ptr<const ArraySource> make_source(const std::vector<ColumnSpec>& specs) {
  std::vector<Column> cols;
  for (const auto& [name, addr, rows, stride, row_bytes, code, bits, shape] : specs) {
    Column c;
    c.name = name;
    c.base = reinterpret_cast<const uint8_t*>(addr);
    c.rows = rows;
    c.row_stride = stride;
    c.row_bytes = row_bytes;
    c.dtype = DType{static_cast<DTypeCode>(code), static_cast<uint8_t>(bits)};
    c.row_shape = shape;
    size_t expect = c.dtype.itemsize();
    for (int64_t d : shape) expect *= static_cast<size_t>(d);
    STOKER_CHECK_AS(ValueError, expect == row_bytes, "column '", name, "': row of ", row_bytes,
                    " bytes does not match its shape and element type (", expect, " bytes)");
    cols.push_back(std::move(c));
  }
  return std::make_shared<const ArraySource>(std::move(cols));
}

py::list to_tensors(const ArraySource& source, GatheredBatch& batch) {
  py::list out;
  const auto& cols = source.columns();
  for (size_t c = 0; c < cols.size(); ++c) {
    std::vector<int64_t> shape{batch.rows};
    shape.insert(shape.end(), cols[c].row_shape.begin(), cols[c].row_shape.end());
    void* data = static_cast<uint8_t*>(batch.block->data) + batch.offsets[c];
    out.append(to_capsule(export_dlpack(batch.block, data, cols[c].dtype, shape)));
  }
  batch.block.reset();
  return out;
}

struct PyArrayPipeline {
  std::shared_ptr<const ArraySource> source;
  std::unique_ptr<ArrayPipeline> pipeline;

  ~PyArrayPipeline() {
    // A forked child leaks it (see ArrayPipeline::owned_here): destroying it there could wait forever.
    if (pipeline && !pipeline->owned_here()) (void)pipeline.release();
  }
};

}  // namespace

void register_pipeline(py::module_& m) {
  py::class_<ArraySource, std::shared_ptr<ArraySource>>(m, "ArraySource")
      .def(py::init([](const std::vector<ColumnSpec>& specs) {
             return std::const_pointer_cast<ArraySource>(make_source(specs));
           }),
           py::arg("columns"))
      .def("__len__", &ArraySource::size)
      .def("gather", [](std::shared_ptr<ArraySource> source, std::shared_ptr<BufferPool> pool,
                        py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx, int64_t number) {
             // One batch gathered here and now, on the calling thread (no handoff to a pipeline's thread).
             GatheredBatch batch;
             std::vector<int64_t> indices(idx.data(), idx.data() + idx.size());
             {
               ReleaseGil release;
               batch.rows = static_cast<int64_t>(indices.size());
               const size_t bytes = source->batch_layout(batch.rows, &batch.offsets);
               batch.block = pool->acquire(bytes);
               try {
                 source->gather(indices.data(), batch.rows, static_cast<uint8_t*>(batch.block->data),
                                batch.offsets);
               } catch (const IndexError& e) {
                 throw IndexError(detail::concat(e.what(), " (in batch ", number, ")"));
               }
             }
             return to_tensors(*source, batch);
           }, py::arg("pool"), py::arg("indices"), py::arg("number"),
           "Gathers the rows of `indices` into a block of `pool` on the calling thread: one capsule per column. "
           "An index out of range raises IndexError naming it and batch `number`.");

  py::class_<PyArrayPipeline>(m, "ArrayPipeline")
      .def(py::init([](std::shared_ptr<ArraySource> source, std::shared_ptr<BufferPool> pool,
                       std::optional<std::tuple<int64_t, int64_t, bool, bool, uint64_t, uint64_t, int64_t, int64_t>> stream,
                       int64_t start_batch, int num_threads, int depth) {
             std::optional<IndexStream> s;
             if (stream) {
               auto [n, bs, drop_last, shuffle, seed, epoch, rank, world_size] = *stream;
               STOKER_CHECK_AS(ValueError, n == source->size(), "the index stream covers ", n,
                               " samples but the source holds ", source->size());
               s.emplace(n, bs, drop_last, shuffle, seed, epoch, Shard{rank, world_size});
             }
             auto p = std::make_unique<PyArrayPipeline>();
             p->source = source;
             p->pipeline = std::make_unique<ArrayPipeline>(source, std::move(pool), std::move(s),
                                                           start_batch, num_threads, depth);
             return p;
           }),
           py::arg("source"), py::arg("pool"), py::arg("stream"), py::arg("start_batch"),
           py::arg("num_threads"), py::arg("depth"))
      .def("submit", [](PyArrayPipeline& p, py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx,
                        int64_t number) {
             std::vector<int64_t> v(idx.data(), idx.data() + idx.size());
             p.pipeline->submit(std::move(v), number);
           }, py::arg("indices"), py::arg("number"),
           "Queues batch `number` of the epoch (an index out of range raises IndexError naming it).")
      .def("close_submissions", [](PyArrayPipeline& p) { p.pipeline->close_submissions(); })
      .def("next", [](PyArrayPipeline& p) -> py::object {
             GatheredBatch batch;
             bool more;
             {
               ReleaseGil release;
               more = p.pipeline->next(&batch);
             }
             if (!more) return py::none();
             return to_tensors(*p.source, batch);
           })
      .def_property_readonly("delivered", [](const PyArrayPipeline& p) { return p.pipeline->delivered(); })
      .def("stop", [](PyArrayPipeline& p) {
             ReleaseGil release;
             p.pipeline->stop();
           });
}

}  // namespace stoker::bindings
