#include <mutex>
#include <optional>

#include "stoker/bindings/bindings.h"
#include "stoker/common/check.h"
#include "stoker/packing/materialize.h"
#include "stoker/packing/pipeline.h"
#include "stoker/packing/plan.h"
#include "stoker/packing/row_helper.h"

namespace stoker::bindings {
namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Documents as the Python side holds them: the arrays stay referenced while the source lives.
struct PyTokenSource {
  py::array tokens;
  Int64Array offsets;
  TokenSource view;
  std::vector<int64_t> lengths;
};

std::shared_ptr<PyTokenSource> make_source(py::array tokens, Int64Array offsets) {
  STOKER_CHECK_AS(ValueError, tokens.ndim() == 1, "the token array must be 1-D, got ", tokens.ndim(), "-D");
  STOKER_CHECK_AS(ValueError, offsets.ndim() == 1 && offsets.size() >= 1,
                  "the offsets must be a 1-D array of at least one entry");
  STOKER_CHECK_AS(ValueError,
                  tokens.size() == 0 || tokens.strides(0) == static_cast<py::ssize_t>(tokens.itemsize()),
                  "the token array must be contiguous");
  auto dt = dtype_of(tokens.dtype());
  const bool ok = dt && ((dt->code == DTypeCode::UInt && (dt->bits == 16 || dt->bits == 32)) ||
                         (dt->code == DTypeCode::Int && (dt->bits == 32 || dt->bits == 64)));
  STOKER_CHECK_AS(TypeError, ok, "tokens must be uint16, int32, uint32 or int64, got ",
                  std::string(py::str(tokens.dtype())));
  auto src = std::make_shared<PyTokenSource>();
  src->tokens = tokens;
  src->offsets = offsets;
  const int64_t* off = offsets.data();
  const int64_t docs = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t n = static_cast<int64_t>(tokens.size());
  STOKER_CHECK_AS(ValueError, off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  src->lengths.resize(static_cast<size_t>(docs));
  for (int64_t d = 0; d < docs; ++d) {
    STOKER_CHECK_AS(ValueError, off[d + 1] >= off[d], "offsets must not decrease: offsets[", d + 1, "] = ",
                    off[d + 1], " < offsets[", d, "] = ", off[d]);
    STOKER_CHECK_AS(ValueError, off[d + 1] <= n, "offsets[", d + 1, "] = ", off[d + 1],
                    " is past the end of the ", n, " tokens");
    src->lengths[d] = off[d + 1] - off[d];
  }
  STOKER_CHECK_AS(ValueError, off[docs] == n, "the last offset (offsets[", docs, "] = ", off[docs],
                  ") must equal the number of tokens, ", n);
  src->view = TokenSource{tokens.data(), *dt, n, off, docs};
  return src;
}

// The document order as the planner takes it, each id checked against the source.
std::vector<int64_t> order_of(const PyTokenSource& source, const Int64Array& order, int long_docs) {
  STOKER_CHECK_AS(ValueError, long_docs >= 0 && long_docs <= 2, "bad long_docs code ", long_docs);
  STOKER_CHECK_AS(ValueError, order.ndim() == 1, "the document order must be 1-D");
  const int64_t* o = order.data();
  std::vector<int64_t> ord(o, o + order.size());
  for (int64_t d : ord)
    STOKER_CHECK_AS(IndexError, d >= 0 && d < source.view.num_docs, "document ", d, " out of range");
  return ord;
}

// A packed batch as Python takes it: capsules of input_ids, labels, position_ids, cu_seqlens, seq_idx and
// doc_ids (None unless asked for), then the longest segment.
py::tuple batch_to_python(PackedBatch& b) {
  auto* base = static_cast<uint8_t*>(b.block->data);
  const DType i64{DTypeCode::Int, 64}, i32{DTypeCode::Int, 32};
  const std::vector<int64_t> grid{b.rows, b.seq_len};
  py::object docs = py::none();
  if (b.has_doc_ids) docs = to_capsule(export_dlpack(b.block, base + b.doc_ids, i64, grid));
  return py::make_tuple(to_capsule(export_dlpack(b.block, base + b.input_ids, i64, grid)),
                        to_capsule(export_dlpack(b.block, base + b.labels, i64, grid)),
                        to_capsule(export_dlpack(b.block, base + b.position_ids, i64, grid)),
                        to_capsule(export_dlpack(b.block, base + b.cu_seqlens, i32, {b.num_segments + 1})),
                        to_capsule(export_dlpack(b.block, base + b.seq_idx, i32, grid)), docs, b.max_length);
}

// The helper, leaked in a forked child (see RowHelper::owned_here), with the next batch it may have begun
// and the Python objects that batch reads (kept until it is finished or dropped).
struct PyRowHelper {
  std::unique_ptr<RowHelper> helper = std::make_unique<RowHelper>();
  std::mutex mu;  // one batch at a time, should two threads share an iterator
  PreparedBatchPtr pending;
  py::object pending_keep;  // (plan, source) of the pending batch

  // Finishes and drops the pending batch, stops the thread.
  void stop() {
    {
      ReleaseGil release;
      std::lock_guard<std::mutex> lock(mu);
      pending.reset();
      helper->stop();
    }
    pending_keep = py::object();
  }

  ~PyRowHelper() {
    if (!helper->owned_here()) {
      (void)helper.release();
      (void)pending.release();
      return;
    }
    stop();
  }
};

// The pipeline with what its threads read kept alive: the plan (shared), and the token source's arrays
// (Python objects, released only after the threads are joined).
struct PyPackPipeline {
  py::object source;
  std::unique_ptr<PackPipeline> pipeline;

  ~PyPackPipeline() {
    if (pipeline && !pipeline->owned_here()) {
      (void)pipeline.release();  // a forked child: leaked, never destroyed (see PackPipeline::owned_here)
    } else if (pipeline) {
      ReleaseGil release;  // joining waits for a batch being built, which needs no GIL
      pipeline.reset();
    }
  }
};

}  // namespace

void register_packing(py::module_& m) {
  py::class_<PyTokenSource, std::shared_ptr<PyTokenSource>>(m, "TokenSource")
      .def(py::init(&make_source), py::arg("tokens"), py::arg("offsets"))
      .def("__len__", [](const PyTokenSource& s) { return s.view.num_docs; })
      .def_property_readonly("num_tokens", [](const PyTokenSource& s) { return s.view.num_tokens; })
      .def_property_readonly("lengths", [](py::object self) {
        auto& s = self.cast<PyTokenSource&>();
        return py::array_t<int64_t>({static_cast<py::ssize_t>(s.lengths.size())}, {sizeof(int64_t)},
                                    s.lengths.data(), self);  // a view kept alive by the source
      });

  py::class_<PackPlan, std::shared_ptr<PackPlan>>(m, "PackPlan")
      .def_property_readonly("num_rows", &PackPlan::num_rows)
      .def_property_readonly("seq_len", [](const PackPlan& p) { return p.seq_len; })
      .def("stats", [](const PackPlan& p) {
        py::dict d;
        d["documents"] = p.stats.documents;
        d["tokens"] = p.stats.tokens;
        d["rows"] = p.stats.rows;
        d["documents_split"] = p.stats.documents_split;
        d["documents_dropped"] = p.stats.documents_dropped;
        d["tokens_dropped"] = p.stats.tokens_dropped;
        d["max_delay_rows"] = p.stats.max_delay_rows;
        return d;
      })
      .def("tokens_in_rows", &PackPlan::tokens_in_rows, py::arg("first"), py::arg("last"))
      .def("row", [](const PackPlan& p, int64_t r) {
        STOKER_CHECK_AS(IndexError, r >= 0 && r < p.num_rows(), "row ", r, " out of range");
        py::list out;
        for (int64_t k = p.row_start[r]; k < p.row_start[r + 1]; ++k) {
          const Segment& s = p.segments[k];
          out.append(py::make_tuple(s.doc, s.offset, s.length));
        }
        return out;
      }, py::arg("r"));

  m.def("plan_packing", [](const PyTokenSource& source, Int64Array order, int64_t seq_len, int64_t window,
                           int long_docs, bool shuffle_rows, uint64_t seed, uint64_t epoch, int64_t rank,
                           int64_t world_size) {
        std::vector<int64_t> ord = order_of(source, order, long_docs);
        ReleaseGil release;
        return std::make_shared<PackPlan>(plan_shard(source.lengths.data(), ord, rank, world_size, seq_len, window,
                                                     static_cast<LongDocs>(long_docs), shuffle_rows, seed, epoch));
      },
      py::arg("source"), py::arg("order"), py::arg("seq_len"), py::arg("window"), py::arg("long_docs"),
      py::arg("shuffle_rows"), py::arg("seed"), py::arg("epoch"), py::arg("rank"), py::arg("world_size"));

  m.def("packing_shard_rows", [](const PyTokenSource& source, Int64Array order, int64_t seq_len, int64_t window,
                                 int long_docs, int64_t world_size) {
        std::vector<int64_t> ord = order_of(source, order, long_docs);
        std::vector<int64_t> counts;
        {
          ReleaseGil release;
          counts = shard_row_counts(source.lengths.data(), ord, world_size, seq_len, window,
                                    static_cast<LongDocs>(long_docs));
        }
        return py::array_t<int64_t>(static_cast<py::ssize_t>(counts.size()), counts.data());
      },
      py::arg("source"), py::arg("order"), py::arg("seq_len"), py::arg("window"), py::arg("long_docs"),
      py::arg("world_size"));

  m.def("current_cpu", &current_cpu, "The core the calling thread runs on (-1 where unknown)");

  py::class_<PyRowHelper>(m, "RowHelper")
      .def(py::init<>())
      .def_property_readonly("rows_written", [](const PyRowHelper& h) { return h.helper->rows_written(); },
                             "Rows the helper thread has written so far")
      .def("stop", &PyRowHelper::stop, "Drops the batch begun ahead (written to the end first) and stops the thread");

  m.def("materialize_packed", [](std::shared_ptr<PackPlan> plan, py::object source_obj, Int64Array rows,
                                 int64_t pad_id, bool doc_ids, bool shift_labels, std::shared_ptr<BufferPool> pool,
                                 PyRowHelper* helper, std::optional<Int64Array> next_rows) {
        STOKER_CHECK_AS(ValueError, rows.ndim() == 1, "rows must be 1-D");
        STOKER_CHECK_AS(ValueError, !next_rows || next_rows->ndim() == 1, "next_rows must be 1-D");
        const auto& source = source_obj.cast<const PyTokenSource&>();
        const auto n = static_cast<int64_t>(rows.size());
        PackedBatch b;
        bool begun_next = false;
        {
          ReleaseGil release;
          std::unique_lock<std::mutex> lock;
          if (helper != nullptr) lock = std::unique_lock<std::mutex>(helper->mu);
          RowHelper* h = helper != nullptr ? helper->helper.get() : nullptr;
          PreparedBatchPtr ready = helper != nullptr ? std::move(helper->pending) : PreparedBatchPtr();
          if (ready && prepared_for(*ready, *plan, rows.data(), n, pad_id, doc_ids, shift_labels, *pool)) {
            b = finish_packed(std::move(ready), h);  // begun by the helper while the caller was away
          } else {
            ready.reset();  // another batch was asked for: the one begun is written out and dropped
            b = materialize(*plan, source.view, rows.data(), n, pad_id, doc_ids, shift_labels, *pool, h);
          }
          if (h != nullptr && next_rows && next_rows->size() > 0) {
            // The next batch is begun now, the helper writing it from the back while Python takes this one
            // over; its errors are raised when it is asked for (prepared again then).
            try {
              helper->pending = prepare_packed(*plan, source.view, next_rows->data(),
                                               static_cast<int64_t>(next_rows->size()), pad_id, doc_ids,
                                               shift_labels, *pool, h);
              begun_next = true;
            } catch (const std::exception&) {
            }
          }
        }
        if (helper != nullptr)
          helper->pending_keep = begun_next ? py::make_tuple(py::cast(plan), source_obj) : py::object();
        return batch_to_python(b);
      },
      py::arg("plan"), py::arg("source"), py::arg("rows"), py::arg("pad_id"), py::arg("doc_ids"),
      py::arg("shift_labels"), py::arg("pool"), py::arg("helper") = nullptr, py::arg("next_rows") = py::none());

  py::class_<PyPackPipeline>(m, "PackPipeline")
      .def(py::init([](std::shared_ptr<PackPlan> plan, py::object source, Int64Array rows, int64_t batch_size,
                       int64_t pad_id, bool doc_ids, bool shift_labels, int64_t start_batch, int64_t num_batches,
                       std::shared_ptr<BufferPool> pool, int num_threads, int depth) {
             STOKER_CHECK_AS(ValueError, rows.ndim() == 1, "rows must be 1-D");
             const auto& src = source.cast<const PyTokenSource&>();
             auto p = std::make_unique<PyPackPipeline>();
             p->source = source;
             p->pipeline = std::make_unique<PackPipeline>(
                 std::move(plan), src.view, std::vector<int64_t>(rows.data(), rows.data() + rows.size()),
                 PackBatchSpec{batch_size, pad_id, doc_ids, shift_labels}, start_batch, num_batches, std::move(pool),
                 num_threads, depth);
             return p;
           }),
           py::arg("plan"), py::arg("source"), py::arg("rows"), py::arg("batch_size"), py::arg("pad_id"),
           py::arg("doc_ids"), py::arg("shift_labels"), py::arg("start_batch"), py::arg("num_batches"),
           py::arg("pool"), py::arg("num_threads"), py::arg("depth"))
      .def("next", [](PyPackPipeline& p) -> py::object {
             STOKER_CHECK(p.pipeline, "the packing pipeline was stopped");
             PackedBatch b;
             bool more;
             {
               ReleaseGil release;
               more = p.pipeline->next(&b);
             }
             if (!more) return py::none();
             return batch_to_python(b);
           },
           "The next batch as materialize_packed returns it, or None after the last")
      .def_property_readonly("delivered",
                             [](const PyPackPipeline& p) { return p.pipeline ? p.pipeline->delivered() : 0; })
      .def("stop", [](PyPackPipeline& p) {
             if (!p.pipeline) return;
             ReleaseGil release;
             p.pipeline->stop();
           });
}

}  // namespace stoker::bindings
