#include "stoker/packing/plan.h"

#include <algorithm>

#include "stoker/common/check.h"
#include "stoker/sampler/permutation.h"

namespace stoker {
namespace {

// The pieces of the epoch in arrival order, after the over-long rule.
std::vector<Segment> pieces_of(const int64_t* lengths, const std::vector<int64_t>& order, int64_t seq_len,
                               LongDocs long_docs, PackStats* stats) {
  std::vector<Segment> pieces;
  pieces.reserve(order.size());
  for (int64_t doc : order) {
    const int64_t len = lengths[doc];
    ++stats->documents;
    if (len <= 0) continue;
    if (len <= seq_len) {
      pieces.push_back({doc, 0, len});
      continue;
    }
    switch (long_docs) {
      case LongDocs::kSplit:
        ++stats->documents_split;
        for (int64_t off = 0; off < len; off += seq_len) pieces.push_back({doc, off, std::min(seq_len, len - off)});
        break;
      case LongDocs::kTruncate:
        stats->tokens_dropped += len - seq_len;
        pieces.push_back({doc, 0, seq_len});
        break;
      case LongDocs::kDrop:
        ++stats->documents_dropped;
        stats->tokens_dropped += len;
        break;
    }
  }
  return pieces;
}

// A set of integers in [0, n] with next-at-or-above and last-at-or-below queries: a bitmap with a summary
// level, so either query scans at most two short runs of 64-bit words.
class IntSet {
 public:
  explicit IntSet(int64_t n) : words_(static_cast<size_t>(n / 64 + 1), 0), summary_(words_.size() / 64 + 1, 0) {}
  void insert(int64_t v) {
    const size_t w = static_cast<size_t>(v >> 6);
    words_[w] |= bit(v);
    summary_[w >> 6] |= bit(static_cast<int64_t>(w));
  }
  void erase(int64_t v) {
    const size_t w = static_cast<size_t>(v >> 6);
    words_[w] &= ~bit(v);
    if (!words_[w]) summary_[w >> 6] &= ~bit(static_cast<int64_t>(w));
  }
  // The least member >= v, or -1.
  int64_t next(int64_t v) const {
    size_t w = static_cast<size_t>(v >> 6);
    if (w >= words_.size()) return -1;
    uint64_t m = words_[w] & (~uint64_t{0} << (v & 63));
    if (m) return static_cast<int64_t>(w * 64 + __builtin_ctzll(m));
    const size_t first = w + 1;
    for (size_t s = first >> 6; s < summary_.size(); ++s) {
      uint64_t sm = summary_[s];
      if (s == (first >> 6)) sm &= (first & 63) ? (~uint64_t{0} << (first & 63)) : ~uint64_t{0};
      if (sm) {
        const size_t ww = s * 64 + __builtin_ctzll(sm);
        return static_cast<int64_t>(ww * 64 + __builtin_ctzll(words_[ww]));
      }
    }
    return -1;
  }
  // The greatest member <= v, or -1.
  int64_t prev(int64_t v) const {
    if (v < 0) return -1;
    size_t w = std::min(static_cast<size_t>(v >> 6), words_.size() - 1);
    const int64_t top = (static_cast<int64_t>(w) == (v >> 6)) ? (v & 63) : 63;
    uint64_t m = words_[w] & (top == 63 ? ~uint64_t{0} : ((uint64_t{1} << (top + 1)) - 1));
    if (m) return static_cast<int64_t>(w * 64 + 63 - __builtin_clzll(m));
    if (w == 0) return -1;
    const size_t last = w - 1;
    for (int64_t s = static_cast<int64_t>(last >> 6); s >= 0; --s) {
      uint64_t sm = summary_[static_cast<size_t>(s)];
      if (static_cast<size_t>(s) == (last >> 6) && (last & 63) != 63) sm &= (uint64_t{1} << ((last & 63) + 1)) - 1;
      if (sm) {
        const size_t ww = static_cast<size_t>(s) * 64 + 63 - __builtin_clzll(sm);
        return static_cast<int64_t>(ww * 64 + 63 - __builtin_clzll(words_[ww]));
      }
    }
    return -1;
  }

 private:
  static uint64_t bit(int64_t v) { return uint64_t{1} << (v & 63); }
  std::vector<uint64_t> words_;
  std::vector<uint64_t> summary_;
};

// Queues of piece indices per length (or per room), each first-in first-out, in flat storage.
class Buckets {
 public:
  explicit Buckets(int64_t n) : items_(static_cast<size_t>(n) + 1), head_(static_cast<size_t>(n) + 1, 0) {}
  void push(int64_t key, int64_t v) { items_[key].push_back(v); }
  bool empty(int64_t key) const { return head_[key] == items_[key].size(); }
  int64_t front(int64_t key) const { return items_[key][head_[key]]; }
  void pop_front(int64_t key) {
    if (++head_[key] == items_[key].size()) {
      items_[key].clear();
      head_[key] = 0;
    }
  }
  int64_t pop_back(int64_t key) {
    const int64_t v = items_[key].back();
    items_[key].pop_back();
    if (head_[key] == items_[key].size()) {
      items_[key].clear();
      head_[key] = 0;
    }
    return v;
  }

 private:
  std::vector<std::vector<int64_t>> items_;
  std::vector<size_t> head_;
};

// Best-fit decreasing over all pieces: pieces longest first (a counting sort, stable, so equal pieces keep
// arrival order), each into the open row with the least room that fits it (rows with equal room: the
// newest), found through the set of rooms that have open rows.
void plan_bfd(const std::vector<Segment>& pieces, int64_t seq_len, bool shuffle_rows, uint64_t seed,
              uint64_t epoch, PackPlan* plan) {
  const size_t n = pieces.size();
  std::vector<int64_t> count(static_cast<size_t>(seq_len) + 2, 0);
  for (const Segment& p : pieces) ++count[static_cast<size_t>(seq_len - p.length)];
  for (size_t i = 1; i < count.size(); ++i) count[i] += count[i - 1];
  std::vector<int64_t> by_length(n);
  for (size_t i = n; i-- > 0;) by_length[--count[static_cast<size_t>(seq_len - pieces[i].length)]] = static_cast<int64_t>(i);

  std::vector<int64_t> row_of(n);  // in by_length order
  std::vector<int64_t> room;
  Buckets open(seq_len);
  IntSet rooms(seq_len);
  for (size_t k = 0; k < n; ++k) {
    const int64_t len = pieces[by_length[k]].length;
    const int64_t r = rooms.next(len);
    int64_t row;
    if (r < 0) {
      row = static_cast<int64_t>(room.size());
      room.push_back(seq_len);
    } else {
      row = open.pop_back(r);
      if (open.empty(r)) rooms.erase(r);
    }
    row_of[k] = row;
    const int64_t left = (room[row] -= len);
    if (left > 0) {
      if (open.empty(left)) rooms.insert(left);
      open.push(left, row);
    }
  }
  // Group the pieces by row (each row keeps the order its pieces went in), rows in an order drawn from
  // (seed, epoch) when asked.
  const int64_t rows = static_cast<int64_t>(room.size());
  std::vector<int64_t> start(static_cast<size_t>(rows) + 1, 0);
  for (size_t k = 0; k < n; ++k) ++start[static_cast<size_t>(row_of[k]) + 1];
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> slot(start.begin(), start.end() - 1);
  std::vector<int64_t> grouped(n);
  for (size_t k = 0; k < n; ++k) grouped[slot[row_of[k]]++] = by_length[k];
  Permutation row_order(shuffle_rows ? rows : 0, seed ^ 0x243f6a8885a308d3ULL, epoch);
  plan->segments.reserve(plan->segments.size() + n);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = shuffle_rows ? row_order(r) : r;
    for (int64_t k = start[src]; k < start[src + 1]; ++k) plan->segments.push_back(pieces[grouped[k]]);
    plan->row_start.push_back(static_cast<int64_t>(plan->segments.size()));
  }
}

// Streaming: a window of W pieces; each row takes the oldest pieces while they fit, then the longest that
// still fits until none does.
void plan_window(const std::vector<Segment>& pieces, int64_t seq_len, int64_t window, PackPlan* plan) {
  Buckets by_len(seq_len);  // buffered pieces by length, oldest first
  IntSet lengths(seq_len);  // lengths with buffered pieces
  std::vector<char> taken(pieces.size(), 0);
  std::vector<int64_t> entered(pieces.size(), 0);  // rows made when a piece arrived
  size_t next = 0;    // next piece to arrive
  size_t oldest = 0;  // no piece before it is still buffered
  int64_t buffered = 0;
  int64_t rows = 0;
  auto refill = [&] {
    while (buffered < window && next < pieces.size()) {
      const int64_t p = static_cast<int64_t>(next++);
      const int64_t len = pieces[p].length;
      if (by_len.empty(len)) lengths.insert(len);
      by_len.push(len, p);
      entered[p] = rows;
      ++buffered;
    }
  };
  auto take_front = [&](int64_t len) {  // the oldest buffered piece of this length
    const int64_t p = by_len.front(len);
    by_len.pop_front(len);
    if (by_len.empty(len)) lengths.erase(len);
    taken[p] = 1;
    --buffered;
    plan->segments.push_back(pieces[p]);
    plan->stats.max_delay_rows = std::max(plan->stats.max_delay_rows, rows - entered[p]);
    return p;
  };
  refill();
  while (buffered > 0) {
    int64_t room = seq_len;
    while (buffered > 0) {
      while (taken[oldest]) ++oldest;
      const int64_t len = pieces[oldest].length;
      if (len > room) break;
      take_front(len);  // the oldest piece is the oldest of its length
      room -= len;
      refill();
    }
    while (room > 0 && buffered > 0) {
      const int64_t len = lengths.prev(room);
      if (len <= 0) break;
      take_front(len);
      room -= len;
      refill();
    }
    plan->row_start.push_back(static_cast<int64_t>(plan->segments.size()));
    ++rows;
  }
}

std::vector<int64_t> strided(const std::vector<int64_t>& order, int64_t rank, int64_t world) {
  std::vector<int64_t> out;
  const auto n = static_cast<int64_t>(order.size());
  out.reserve(static_cast<size_t>(n > rank ? (n - rank + world - 1) / world : 0));
  for (int64_t i = rank; i < n; i += world) out.push_back(order[static_cast<size_t>(i)]);
  return out;
}

void check_shard(int64_t rank, int64_t world) {
  STOKER_CHECK_AS(ValueError, world >= 1 && rank >= 0 && rank < world, "rank ", rank,
                  " out of range for world size ", world);
}

}  // namespace

int64_t PackPlan::tokens_in_rows(int64_t first, int64_t last) const {
  STOKER_CHECK_AS(IndexError, 0 <= first && first <= last && last <= num_rows(), "rows [", first, ", ", last,
                  ") out of range [0, ", num_rows(), "]");
  int64_t tokens = 0;
  for (int64_t k = row_start[first]; k < row_start[last]; ++k) tokens += segments[k].length;
  return tokens;
}

PackPlan plan_shard(const int64_t* lengths, const std::vector<int64_t>& order, int64_t rank, int64_t world,
                    int64_t seq_len, int64_t window, LongDocs long_docs, bool shuffle_rows, uint64_t seed,
                    uint64_t epoch) {
  check_shard(rank, world);
  const uint64_t row_seed = seed + static_cast<uint64_t>(rank) * 0x9e3779b97f4a7c15ULL;
  if (world == 1) return plan_packing(lengths, order, seq_len, window, long_docs, shuffle_rows, row_seed, epoch);
  return plan_packing(lengths, strided(order, rank, world), seq_len, window, long_docs, shuffle_rows, row_seed,
                      epoch);
}

std::vector<int64_t> shard_row_counts(const int64_t* lengths, const std::vector<int64_t>& order, int64_t world,
                                      int64_t seq_len, int64_t window, LongDocs long_docs) {
  check_shard(0, world);
  std::vector<int64_t> counts(static_cast<size_t>(world));
  for (int64_t r = 0; r < world; ++r)
    counts[static_cast<size_t>(r)] =
        plan_packing(lengths, strided(order, r, world), seq_len, window, long_docs, false, 0, 0).num_rows();
  return counts;
}

PackPlan plan_packing(const int64_t* lengths, const std::vector<int64_t>& order, int64_t seq_len,
                      int64_t window, LongDocs long_docs, bool shuffle_rows, uint64_t seed, uint64_t epoch) {
  STOKER_CHECK_AS(ValueError, seq_len > 0, "seq_len must be positive, got ", seq_len);
  PackPlan plan;
  plan.seq_len = seq_len;
  std::vector<Segment> pieces = pieces_of(lengths, order, seq_len, long_docs, &plan.stats);
  plan.segments.reserve(pieces.size());
  if (window <= 0) {
    plan_bfd(pieces, seq_len, shuffle_rows, seed, epoch, &plan);
  } else {
    plan_window(pieces, seq_len, window, &plan);
  }
  plan.stats.rows = plan.num_rows();
  for (const Segment& s : plan.segments) plan.stats.tokens += s.length;
  return plan;
}

}  // namespace stoker
