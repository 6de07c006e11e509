// Packed batches: the rows of a plan written as the tensors a language model takes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "stoker/common/dtype.h"
#include "stoker/packing/plan.h"
#include "stoker/pool/buffer_pool.h"

namespace stoker {

/// Documents as one flat token array and n + 1 offsets: document d is tokens[offsets[d], offsets[d + 1]).
/// The memory belongs to the caller and must outlive every use.
struct TokenSource {
  const void* tokens = nullptr;
  DType dtype;  // uint16, int32, uint32 or int64
  int64_t num_tokens = 0;
  const int64_t* offsets = nullptr;
  int64_t num_docs = 0;
};

/// One packed batch of R rows of L tokens, all arrays in one pooled block:
///   input_ids, labels, position_ids (int64 [R, L]); seq_idx (int32 [R, L]); cu_seqlens (int32 [S + 1]);
///   doc_ids (int64 [R, L], only when asked for; -1 on padding).
/// Each row's padding tail is a segment of its own; labels are -100 on padding and, unshifted, the token
/// itself with -100 at each segment's first token, or, shifted, the segment's next token with -100 at its
/// last; positions restart at 0 in every segment; seq_idx numbers the segments of the batch.
struct PackedBatch {
  std::shared_ptr<Block> block;
  int64_t rows = 0;
  int64_t seq_len = 0;
  int64_t num_segments = 0;
  int64_t max_length = 0;  // the longest segment, padding included
  size_t input_ids = 0, labels = 0, position_ids = 0, seq_idx = 0, cu_seqlens = 0, doc_ids = 0;  // offsets
  bool has_doc_ids = false;
};

/// A row id that materialises as a row of padding only (one padding segment of L tokens).
inline constexpr int64_t kPaddingRow = -1;

class RowHelper;
class PreparedBatch;

/// Writes the rows `row_ids[0..rows)` of `plan` (or kPaddingRow), in that order, into a block from `pool`.
/// With shift_labels, labels[t] = input_ids[t + 1] within a segment (Megatron-style, no shift left to the
/// loss); otherwise labels[t] = input_ids[t] (HF-style, the loss shifts). With a helper, its thread writes
/// rows from the back while the calling thread writes them from the front.
PackedBatch materialize(const PackPlan& plan, const TokenSource& source, const int64_t* row_ids, int64_t rows,
                        int64_t pad_id, bool doc_ids, bool shift_labels, BufferPool& pool,
                        RowHelper* helper = nullptr);

/// materialize() in two steps, so that a helper can start on the next batch while the caller does other
/// work: prepare_packed checks the batch, lays it out and takes its block (with `begin_on`, that helper starts
/// writing its rows from the back at once); finish_packed writes what is left (the calling thread from the
/// front, `helper` beside it when the batch was not begun) and returns the batch. The plan, the token memory
/// and the pool must outlive the prepared batch; dropping one begun and not finished writes it to the end
/// first (a forked child leaks it instead).
struct PreparedDeleter {
  void operator()(PreparedBatch* p) const;
};
using PreparedBatchPtr = std::unique_ptr<PreparedBatch, PreparedDeleter>;

PreparedBatchPtr prepare_packed(const PackPlan& plan, const TokenSource& source, const int64_t* row_ids,
                                int64_t rows, int64_t pad_id, bool doc_ids, bool shift_labels, BufferPool& pool,
                                RowHelper* begin_on);
/// Whether `p` was prepared with these arguments (the same plan, rows, options and pool).
bool prepared_for(const PreparedBatch& p, const PackPlan& plan, const int64_t* row_ids, int64_t rows,
                  int64_t pad_id, bool doc_ids, bool shift_labels, const BufferPool& pool);
PackedBatch finish_packed(PreparedBatchPtr p, RowHelper* helper);

}  // namespace stoker
