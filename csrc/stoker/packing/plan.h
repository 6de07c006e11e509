// Sequence packing: which pieces of which documents fill each row of seq_len tokens.
#pragma once

#include <cstdint>
#include <vector>

namespace stoker {

/// What happens to a document longer than a row.
enum class LongDocs : int { kSplit = 0, kTruncate = 1, kDrop = 2 };

/// One piece of a document placed in a row: tokens [offset, offset + length) of document `doc`.
struct Segment {
  int64_t doc = 0;
  int64_t offset = 0;
  int64_t length = 0;
};

/// Counters of one epoch's plan.
struct PackStats {
  int64_t documents = 0;        // documents considered
  int64_t tokens = 0;           // tokens placed in rows
  int64_t rows = 0;
  int64_t documents_split = 0;  // documents longer than a row, split into several pieces
  int64_t documents_dropped = 0;
  int64_t tokens_dropped = 0;   // by truncation or dropping
  int64_t max_delay_rows = 0;   // streaming: most rows a piece waited in the window after it entered
};

/// The rows of one epoch. Row r holds segments [row_start[r], row_start[r + 1]).
struct PackPlan {
  int64_t seq_len = 0;
  std::vector<int64_t> row_start{0};
  std::vector<Segment> segments;
  PackStats stats;

  int64_t num_rows() const { return static_cast<int64_t>(row_start.size()) - 1; }
  /// The tokens in rows [first, last).
  int64_t tokens_in_rows(int64_t first, int64_t last) const;
};

/// Plans one epoch over the documents in `order` (document ids, in the order they arrive), whose lengths
/// are `lengths[doc]`.
///
/// Over-long documents are split into seq_len pieces plus a remainder (kSplit), cut to seq_len (kTruncate)
/// or left out (kDrop); empty documents are left out. With window <= 0 the whole epoch is packed by
/// best-fit decreasing (each piece, longest first, goes to the open row with the least room that fits it;
/// ties between equal pieces keep arrival order); with shuffle_rows the rows are then put in an order drawn
/// from (seed, epoch) so batches do not come sorted by length. With window = W > 0 pieces stream through a
/// buffer of W: each row takes the oldest buffered pieces, in arrival order, while they fit, then the
/// longest that still fits until none does; rows come out in the order they are made, so no piece waits
/// much longer than W / (pieces per row) rows.
PackPlan plan_packing(const int64_t* lengths, const std::vector<int64_t>& order, int64_t seq_len,
                      int64_t window, LongDocs long_docs, bool shuffle_rows, uint64_t seed, uint64_t epoch);

/// Plans shard `rank` of `world`: the documents at positions rank, rank + world, rank + 2 * world, ... of
/// `order`, packed as plan_packing packs them; rows are shuffled with a seed drawn from (seed, rank), which
/// is `seed` itself for rank 0, so shard 0 of 1 is plan_packing over the whole order.
PackPlan plan_shard(const int64_t* lengths, const std::vector<int64_t>& order, int64_t rank, int64_t world,
                    int64_t seq_len, int64_t window, LongDocs long_docs, bool shuffle_rows, uint64_t seed,
                    uint64_t epoch);

/// The row count of every shard's plan, rank by rank (a count does not depend on how rows are shuffled):
/// what lets every rank know the epoch's length on all of them without communicating.
std::vector<int64_t> shard_row_counts(const int64_t* lengths, const std::vector<int64_t>& order, int64_t world,
                                      int64_t seq_len, int64_t window, LongDocs long_docs);

}  // namespace stoker
