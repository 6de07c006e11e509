// The index stream: (n, batch_size, drop_last, shuffle, seed, epoch) -> batches of dataset indices.
#pragma once

#include <cstdint>

#include "stoker/sampler/permutation.h"

namespace stoker {

/// The batches of one epoch. Batch b holds the positions [b*batch_size, min(n, (b+1)*batch_size)) of the
/// epoch's order: identity without shuffle, Permutation(n, seed, epoch) with it. Any batch is computed
/// directly, so the whole state of a stream is (seed, epoch, batches served).
class IndexStream {
 public:
  IndexStream(int64_t n, int64_t batch_size, bool drop_last, bool shuffle, uint64_t seed,
              uint64_t epoch);
  int64_t num_batches() const { return num_batches_; }
  int64_t batch_size() const { return batch_size_; }
  /// Number of indices in batch b.
  int64_t batch_len(int64_t b) const;
  /// Writes the batch_len(b) indices of batch b to out.
  void batch_indices(int64_t b, int64_t* out) const;

 private:
  int64_t n_;
  int64_t batch_size_;
  bool shuffle_;
  int64_t num_batches_;
  Permutation perm_;
};

}  // namespace stoker
