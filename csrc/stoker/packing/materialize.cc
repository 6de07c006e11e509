#include "stoker/packing/materialize.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "stoker/common/check.h"
#include "stoker/packing/row_helper.h"

namespace stoker {
namespace {

constexpr int64_t kIgnore = -100;

size_t align64(size_t x) { return (x + 63) & ~size_t{63}; }

// The writing loop below is compiled twice on x86-64 (GCC, Clang): for the baseline ISA the wheel targets and
// for AVX2, picked once at run time. Widening uint16/int32 tokens to int64 and the four output streams take
// half the instructions with 256-bit stores (measured on a 2-core EPYC VM: ~18% less time per batch). The
// helpers are forced inline so that each copy of the loop gets them compiled for its own ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STOKER_PACK_AVX2 1
#endif
#if defined(__GNUC__) || defined(__clang__)
#define STOKER_FORCE_INLINE inline __attribute__((always_inline))
#else
#define STOKER_FORCE_INLINE inline
#endif

// The outputs of one batch, each at the batch's flat position of the segment being written.
struct Outputs {
  int64_t* __restrict ids;
  int64_t* __restrict labels;
  int64_t* __restrict pos;
  int32_t* __restrict sidx;
  int64_t* __restrict docs;  // null unless doc_ids were asked for
};

// Writes one segment in a single pass over its tokens: input_ids, labels (unshifted: the token, -100 first;
// shifted: the next token, -100 last), positions 0..n-1 and the segment number. One pass keeps every output
// stream moving together instead of reading the ids back for the labels and walking the segment four times.
// Segments are never empty.
template <typename T>
STOKER_FORCE_INLINE void write_segment(const T* __restrict from, int64_t n, const Outputs& o, int32_t seg, bool shift) {
  int64_t* __restrict ids = o.ids;
  int64_t* __restrict labels = o.labels;
  int64_t* __restrict pos = o.pos;
  int32_t* __restrict sidx = o.sidx;
  if (shift) {
    for (int64_t i = 0; i + 1 < n; ++i) {
      ids[i] = static_cast<int64_t>(from[i]);
      labels[i] = static_cast<int64_t>(from[i + 1]);
      pos[i] = i;
      sidx[i] = seg;
    }
    ids[n - 1] = static_cast<int64_t>(from[n - 1]);
    labels[n - 1] = kIgnore;
    pos[n - 1] = n - 1;
    sidx[n - 1] = seg;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = static_cast<int64_t>(from[i]);
      ids[i] = t;
      labels[i] = t;
      pos[i] = i;
      sidx[i] = seg;
    }
    labels[0] = kIgnore;
  }
}

// The token types a source may hold (checked before anything is written).
enum class TokenType { U16, U32, I32, I64 };

TokenType token_type(DType dtype) {
  if (dtype.code == DTypeCode::UInt && dtype.bits == 16) return TokenType::U16;
  if (dtype.code == DTypeCode::UInt && dtype.bits == 32) return TokenType::U32;
  if (dtype.code == DTypeCode::Int && dtype.bits == 32) return TokenType::I32;
  if (dtype.code == DTypeCode::Int && dtype.bits == 64) return TokenType::I64;
  throw TypeError("token arrays must be uint16, int32, uint32 or int64");
}

// The tokens at `from` (of type `type`) as segment `seg`: see write_segment.
STOKER_FORCE_INLINE void write_tokens(TokenType type, const char* from, int64_t n, const Outputs& o, int32_t seg,
                                      bool shift) {
  switch (type) {
    case TokenType::U16:
      return write_segment(reinterpret_cast<const uint16_t*>(from), n, o, seg, shift);
    case TokenType::U32:
      return write_segment(reinterpret_cast<const uint32_t*>(from), n, o, seg, shift);
    case TokenType::I32:
      return write_segment(reinterpret_cast<const int32_t*>(from), n, o, seg, shift);
    case TokenType::I64:
      return write_segment(reinterpret_cast<const int64_t*>(from), n, o, seg, shift);
  }
}

// A row's padding tail: pad_id, -100, positions 0..n-1 and its own segment number.
STOKER_FORCE_INLINE void write_padding(int64_t n, int64_t pad_id, const Outputs& o, int32_t seg) {
  int64_t* __restrict ids = o.ids;
  int64_t* __restrict labels = o.labels;
  int64_t* __restrict pos = o.pos;
  int32_t* __restrict sidx = o.sidx;
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = pad_id;
    labels[i] = kIgnore;
    pos[i] = i;
    sidx[i] = seg;
  }
}

struct TokenRange {
  const char* data;
  size_t bytes;
};


// Where each row of a batch starts among the batch's token ranges and segments (rows are written on their
// own, possibly by two threads: see RowHelper).
struct RowStart {
  int64_t range;    // index of its first token range
  int32_t segment;  // number of its first segment in the batch
};

// What the writing needs: the batch's rows and their token ranges (checked), and where to write.
struct BatchJob {
  const PackPlan* plan;
  const int64_t* row_ids;
  int64_t rows;
  const TokenRange* ranges;  // the tokens of every segment, in the order the rows meet them
  const RowStart* starts;    // rows + 1 entries
  int64_t* row_max;          // the longest segment of each row, written by the row's writer
  TokenType type;
  int64_t pad_id;
  bool shift_labels;
  int64_t* ids;
  int64_t* labels;
  int64_t* pos;
  int32_t* sidx;
  int32_t* cu;
  int64_t* docs;  // null unless doc_ids were asked for
};

// Token reads are what a packed batch waits on: its segments start at random places of a large (often
// memory-mapped) token array, so each one begins with cache misses that writing the outputs cannot hide.
// Each writing thread prefetches the token bytes kPrefetchAhead in front of what it has written, through
// the rows in the order it takes them, which keeps several of those misses in flight at once (measured on
// a 2-core EPYC VM: a batch of 8 rows of 4096 uint16 tokens over a 240 MB token array, 2.4x faster than
// without; prefetching whole rows ahead at once was slower than this steady stream).
constexpr size_t kPrefetchAhead = 16 << 10;

class Prefetcher {
 public:
  // Starts at row `row`, then goes on to row + step, row + 2 step, ... while they are in the batch.
  Prefetcher(const BatchJob& job, int64_t row, int64_t step)
      : job_(job), step_(step), row_(row), range_(job.starts[row].range) {}

  // Issues prefetches for `written` bytes (of this thread's rows, in order) plus kPrefetchAhead.
  STOKER_FORCE_INLINE void run_to(size_t written) {
    const size_t upto = written + kPrefetchAhead;
    while (issued_ < upto) {
      while (range_ == job_.starts[row_ + 1].range) {  // this row's ranges are done: the next row's
        row_ += step_;
        if (row_ < 0 || row_ >= job_.rows) {
          issued_ = SIZE_MAX;
          return;
        }
        range_ = job_.starts[row_].range;
      }
      const TokenRange& r = job_.ranges[range_];
      const uintptr_t first = reinterpret_cast<uintptr_t>(r.data) & ~uintptr_t{63};
      const uintptr_t end = reinterpret_cast<uintptr_t>(r.data) + r.bytes;
      for (uintptr_t line = first + line_; line < end && issued_ < upto; line += 64, line_ += 64, issued_ += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(line));
      if (first + line_ >= end) {
        ++range_;
        line_ = 0;
      }
    }
  }

 private:
  const BatchJob& job_;
  int64_t step_;
  int64_t row_;       // the row being prefetched
  int64_t range_;     // its range being prefetched
  uintptr_t line_ = 0;  // that range's next line, from its first
  size_t issued_ = 0;   // bytes prefetched so far (whole lines)
};

// One writing thread's state through a batch: its prefetch stream and the token bytes it has written.
struct Writer {
  Prefetcher prefetch;
  size_t written = 0;
};

// Writes row i of the job: its segments, its padding tail, their cu_seqlens ends and its longest segment.
STOKER_FORCE_INLINE void write_row_body(const BatchJob& job, int64_t i, Writer& w) {
  const PackPlan& plan = *job.plan;
  const int64_t L = plan.seq_len;
  const int64_t r = job.row_ids[i];
  int64_t flat = i * L;  // position in the flattened batch
  const int64_t row_end = flat + L;
  int32_t seg = job.starts[i].segment;
  const TokenRange* range = job.ranges + job.starts[i].range;
  int64_t max_length = 0;
  auto at_flat = [&]() {
    return Outputs{job.ids + flat, job.labels + flat, job.pos + flat, job.sidx + flat,
                   job.docs ? job.docs + flat : nullptr};
  };
  auto close_segment = [&](int64_t len) {
    flat += len;
    max_length = std::max(max_length, len);
    job.cu[++seg] = static_cast<int32_t>(flat);
  };
  const int64_t first = r == kPaddingRow ? 0 : plan.row_start[r];
  const int64_t last = r == kPaddingRow ? 0 : plan.row_start[r + 1];
  for (int64_t k = first; k < last; ++k) {
    const Segment& s = plan.segments[k];
    const TokenRange& tokens = *range++;
    w.written += tokens.bytes;
    w.prefetch.run_to(w.written);
    const Outputs o = at_flat();
    write_tokens(job.type, tokens.data, s.length, o, seg, job.shift_labels);
    if (job.docs) std::fill(o.docs, o.docs + s.length, s.doc);
    close_segment(s.length);
  }
  if (flat < row_end) {
    const int64_t pad = row_end - flat;
    const Outputs o = at_flat();
    write_padding(pad, job.pad_id, o, seg);
    if (job.docs) std::fill(o.docs, o.docs + pad, int64_t{-1});
    close_segment(pad);
  }
  job.row_max[i] = max_length;
}

void write_row_baseline(const BatchJob& job, int64_t i, Writer& w) { write_row_body(job, i, w); }

#ifdef STOKER_PACK_AVX2
__attribute__((target("avx2"))) void write_row_avx2(const BatchJob& job, int64_t i, Writer& w) {
  write_row_body(job, i, w);
}
#endif

using WriteRow = void (*)(const BatchJob&, int64_t, Writer&);

WriteRow row_writer() {
#ifdef STOKER_PACK_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return write_row_avx2;
#endif
  return write_row_baseline;
}

// A batch of a few thousand tokens is written in about the time handing half of it over takes.
constexpr int64_t kHelpFrom = 8192;  // tokens

}  // namespace

// A batch checked, laid out in its block and ready to be written, perhaps already begun by a helper. Heap
// allocated and never moved: its job and writers point into it.
class PreparedBatch {
 public:
  PackedBatch out;
  std::vector<int64_t> row_ids;
  std::vector<TokenRange> ranges;
  std::vector<RowStart> starts;
  std::vector<int64_t> row_max;
  BatchJob job{};
  WriteRow write = nullptr;
  std::optional<Writer> writers[2];  // from the front, from the back: each touched by its thread only
  const BufferPool* pool = nullptr;
  RowHelper* helper = nullptr;  // the helper that began it
  bool finished = false;

  bool helpable() const { return job.rows >= 2 && job.rows * job.plan->seq_len >= kHelpFrom; }

  static void write_row(void* self, int64_t i, bool first, bool from_back) {
    auto* p = static_cast<PreparedBatch*>(self);
    std::optional<Writer>& w = p->writers[from_back ? 1 : 0];
    if (first) w.emplace(Writer{Prefetcher(p->job, i, from_back ? -1 : 1)});
    p->write(p->job, i, *w);
  }
};

void PreparedDeleter::operator()(PreparedBatch* p) const {
  if (p->helper != nullptr && !p->finished) {
    // Begun by a helper and never asked for: its rows are written to the end before the block goes (the
    // helper may be writing one now). In a forked child the helper is not there: leaked, never freed.
    if (!p->helper->owned_here()) return;
    p->helper->finish(p->job.rows, &PreparedBatch::write_row, p, true);
  }
  delete p;
}

PreparedBatchPtr prepare_packed(const PackPlan& plan, const TokenSource& source, const int64_t* row_ids,
                                int64_t rows, int64_t pad_id, bool doc_ids, bool shift_labels, BufferPool& pool,
                                RowHelper* begin_on) {
  STOKER_CHECK_AS(ValueError, rows > 0, "a packed batch needs at least one row");
  for (int64_t i = 0; i < rows; ++i)
    STOKER_CHECK_AS(IndexError, row_ids[i] == kPaddingRow || (row_ids[i] >= 0 && row_ids[i] < plan.num_rows()),
                    "row ", row_ids[i], " out of range [0, ", plan.num_rows(), ") (or ", kPaddingRow,
                    " for a padding row)");
  const int64_t L = plan.seq_len;
  const TokenType type = token_type(source.dtype);
  PreparedBatchPtr p(new PreparedBatch);
  PackedBatch& b = p->out;
  b.rows = rows;
  b.seq_len = L;
  b.has_doc_ids = doc_ids;
  // What the batch reads, checked against the documents before anything is written.
  const size_t token_bytes = static_cast<size_t>(source.dtype.bits / 8);
  std::vector<TokenRange>& ranges = p->ranges;
  size_t planned = 0;
  for (int64_t i = 0; i < rows; ++i)
    if (row_ids[i] != kPaddingRow)
      planned += static_cast<size_t>(plan.row_start[row_ids[i] + 1] - plan.row_start[row_ids[i]]);
  ranges.reserve(planned);
  std::vector<RowStart>& starts = p->starts;
  starts.resize(static_cast<size_t>(rows) + 1);
  int64_t segments = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = row_ids[i];
    starts[static_cast<size_t>(i)] = {static_cast<int64_t>(ranges.size()), static_cast<int32_t>(segments)};
    if (r == kPaddingRow) {
      ++segments;
      continue;
    }
    int64_t used = 0;
    for (int64_t k = plan.row_start[r]; k < plan.row_start[r + 1]; ++k) {
      const Segment& s = plan.segments[k];
      STOKER_CHECK(s.doc >= 0 && s.doc < source.num_docs && s.offset >= 0 && s.length > 0 &&
                       source.offsets[s.doc] + s.offset + s.length <= source.offsets[s.doc + 1],
                   "packing plan does not match the documents (document ", s.doc, ")");
      ranges.push_back({static_cast<const char*>(source.tokens) +
                            static_cast<size_t>(source.offsets[s.doc] + s.offset) * token_bytes,
                        static_cast<size_t>(s.length) * token_bytes});
      used += s.length;
    }
    segments += plan.row_start[r + 1] - plan.row_start[r] + (used < L ? 1 : 0);
  }
  starts[static_cast<size_t>(rows)] = {static_cast<int64_t>(ranges.size()), static_cast<int32_t>(segments)};
  b.num_segments = segments;
  const size_t cells = static_cast<size_t>(rows * L);
  size_t at = 0;
  b.input_ids = at;
  at = align64(at + cells * 8);
  b.labels = at;
  at = align64(at + cells * 8);
  b.position_ids = at;
  at = align64(at + cells * 8);
  b.seq_idx = at;
  at = align64(at + cells * 4);
  b.cu_seqlens = at;
  at = align64(at + static_cast<size_t>(segments + 1) * 4);
  if (doc_ids) {
    b.doc_ids = at;
    at = align64(at + cells * 8);
  }
  // Batches differ only in their segment count: rounding the block up to 64 KiB gives them one size, so the
  // pool (which keeps blocks per exact size) reuses a freed block instead of mapping fresh pages.
  b.block = pool.acquire((at + 0xFFFF) & ~size_t{0xFFFF});
  auto* base = static_cast<uint8_t*>(b.block->data);
  auto* ids = reinterpret_cast<int64_t*>(base + b.input_ids);
  auto* labels = reinterpret_cast<int64_t*>(base + b.labels);
  auto* pos = reinterpret_cast<int64_t*>(base + b.position_ids);
  auto* sidx = reinterpret_cast<int32_t*>(base + b.seq_idx);
  auto* cu = reinterpret_cast<int32_t*>(base + b.cu_seqlens);
  auto* docs = doc_ids ? reinterpret_cast<int64_t*>(base + b.doc_ids) : nullptr;

  p->row_ids.assign(row_ids, row_ids + rows);
  p->row_max.assign(static_cast<size_t>(rows), 0);
  p->job = BatchJob{&plan, p->row_ids.data(), rows, ranges.data(), starts.data(), p->row_max.data(), type, pad_id,
                    shift_labels, ids, labels, pos, sidx, cu, docs};
  p->write = row_writer();
  p->pool = &pool;
  cu[0] = 0;
  if (begin_on != nullptr && p->helpable() && begin_on->begin(rows, &PreparedBatch::write_row, p.get()))
    p->helper = begin_on;
  return p;
}

bool prepared_for(const PreparedBatch& p, const PackPlan& plan, const int64_t* row_ids, int64_t rows,
                  int64_t pad_id, bool doc_ids, bool shift_labels, const BufferPool& pool) {
  const BatchJob& job = p.job;
  return job.plan == &plan && p.pool == &pool && job.pad_id == pad_id && (job.docs != nullptr) == doc_ids &&
         job.shift_labels == shift_labels && job.rows == rows && std::equal(row_ids, row_ids + rows, job.row_ids);
}

PackedBatch finish_packed(PreparedBatchPtr p, RowHelper* helper) {
  const int64_t n = p->job.rows;
  if (p->helper != nullptr) {
    p->helper->finish(n, &PreparedBatch::write_row, p.get(), true);
  } else if (helper != nullptr && p->helpable()) {
    helper->run(n, &PreparedBatch::write_row, p.get());
  } else {
    for (int64_t i = 0; i < n; ++i) PreparedBatch::write_row(p.get(), i, i == 0, false);
  }
  p->finished = true;
  PackedBatch b = std::move(p->out);
  for (int64_t m : p->row_max) b.max_length = std::max(b.max_length, m);
  return b;
}

PackedBatch materialize(const PackPlan& plan, const TokenSource& source, const int64_t* row_ids, int64_t rows,
                        int64_t pad_id, bool doc_ids, bool shift_labels, BufferPool& pool, RowHelper* helper) {
  return finish_packed(prepare_packed(plan, source, row_ids, rows, pad_id, doc_ids, shift_labels, pool, nullptr),
                       helper);
}

}  // namespace stoker
