#include "stoker/packing/materialize.h"

#include <algorithm>

#include "stoker/common/check.h"

namespace stoker {
namespace {

constexpr int64_t kIgnore = -100;

size_t align64(size_t x) { return (x + 63) & ~size_t{63}; }

// Writes a segment's tokens and labels: unshifted (the token, -100 first) or shifted (the next token, -100
// last). Segments are never empty.
template <typename T>
void copy_tokens(const TokenSource& src, const Segment& s, int64_t* ids, int64_t* labels, bool shift) {
  const T* from = static_cast<const T*>(src.tokens) + src.offsets[s.doc] + s.offset;
  for (int64_t i = 0; i < s.length; ++i) ids[i] = static_cast<int64_t>(from[i]);
  if (shift) {
    std::copy(ids + 1, ids + s.length, labels);
    labels[s.length - 1] = kIgnore;
  } else {
    std::copy(ids, ids + s.length, labels);
    labels[0] = kIgnore;
  }
}

void copy_segment(const TokenSource& src, const Segment& s, int64_t* ids, int64_t* labels, bool shift) {
  switch (src.dtype.code) {
    case DTypeCode::UInt:
      if (src.dtype.bits == 16) return copy_tokens<uint16_t>(src, s, ids, labels, shift);
      if (src.dtype.bits == 32) return copy_tokens<uint32_t>(src, s, ids, labels, shift);
      break;
    case DTypeCode::Int:
      if (src.dtype.bits == 32) return copy_tokens<int32_t>(src, s, ids, labels, shift);
      if (src.dtype.bits == 64) return copy_tokens<int64_t>(src, s, ids, labels, shift);
      break;
    default:
      break;
  }
  throw TypeError("token arrays must be uint16, int32, uint32 or int64");
}

}  // namespace

PackedBatch materialize(const PackPlan& plan, const TokenSource& source, const int64_t* row_ids, int64_t rows,
                        int64_t pad_id, bool doc_ids, bool shift_labels, BufferPool& pool) {
  STOKER_CHECK_AS(ValueError, rows > 0, "a packed batch needs at least one row");
  for (int64_t i = 0; i < rows; ++i)
    STOKER_CHECK_AS(IndexError, row_ids[i] == kPaddingRow || (row_ids[i] >= 0 && row_ids[i] < plan.num_rows()),
                    "row ", row_ids[i], " out of range [0, ", plan.num_rows(), ") (or ", kPaddingRow,
                    " for a padding row)");
  const int64_t L = plan.seq_len;
  PackedBatch b;
  b.rows = rows;
  b.seq_len = L;
  b.has_doc_ids = doc_ids;
  int64_t segments = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = row_ids[i];
    if (r == kPaddingRow) {
      ++segments;
      continue;
    }
    int64_t used = 0;
    for (int64_t k = plan.row_start[r]; k < plan.row_start[r + 1]; ++k) used += plan.segments[k].length;
    segments += plan.row_start[r + 1] - plan.row_start[r] + (used < L ? 1 : 0);
  }
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

  int64_t flat = 0;  // position in the flattened batch
  int32_t seg = 0;
  cu[0] = 0;
  auto close_segment = [&](int64_t len) {
    for (int64_t i = 0; i < len; ++i) pos[flat + i] = i;
    std::fill(sidx + flat, sidx + flat + len, seg);
    flat += len;
    b.max_length = std::max(b.max_length, len);
    cu[++seg] = static_cast<int32_t>(flat);
  };
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = row_ids[i];
    const int64_t row_end = flat + L;
    const int64_t first = r == kPaddingRow ? 0 : plan.row_start[r];
    const int64_t last = r == kPaddingRow ? 0 : plan.row_start[r + 1];
    for (int64_t k = first; k < last; ++k) {
      const Segment& s = plan.segments[k];
      STOKER_CHECK(s.doc >= 0 && s.doc < source.num_docs && s.offset >= 0 &&
                       source.offsets[s.doc] + s.offset + s.length <= source.offsets[s.doc + 1],
                   "packing plan does not match the documents (document ", s.doc, ")");
      copy_segment(source, s, ids + flat, labels + flat, shift_labels);
      if (docs) std::fill(docs + flat, docs + flat + s.length, s.doc);
      close_segment(s.length);
    }
    if (flat < row_end) {
      const int64_t pad = row_end - flat;
      std::fill(ids + flat, ids + row_end, pad_id);
      std::fill(labels + flat, labels + row_end, kIgnore);
      if (docs) std::fill(docs + flat, docs + row_end, int64_t{-1});
      close_segment(pad);
    }
  }
  return b;
}

}  // namespace stoker
