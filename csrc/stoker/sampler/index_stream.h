// The index stream: (n, batch_size, drop_last, shuffle, seed, epoch, rank, world_size) -> batches of
// dataset indices.
#pragma once

#include <cstdint>

#include "stoker/sampler/permutation.h"

namespace stoker {

/// Which part of an epoch's order one rank serves, with torch DistributedSampler's arithmetic.
struct Shard {
  int64_t rank = 0;
  int64_t world_size = 1;
};

/// The batches of one epoch on one rank.
///
/// The epoch's order is the identity without shuffle, Permutation(n, seed, epoch) with it. With
/// world_size W > 1 the order is padded to a multiple of W by repeating it from its start (or, with
/// drop_last, cut to the largest multiple of W below n), and rank r takes the positions r, r + W, r + 2W...
/// — the samples torch's DistributedSampler gives that rank, in the order given by this stream's
/// permutation. Batch b holds the shard positions [b*batch_size, min(m, (b+1)*batch_size)), m being the
/// shard size. Any batch is computed directly, so the whole state of a stream is (seed, epoch, batches
/// served).
class IndexStream {
 public:
  IndexStream(int64_t n, int64_t batch_size, bool drop_last, bool shuffle, uint64_t seed, uint64_t epoch,
              Shard shard = {});
  int64_t num_batches() const { return num_batches_; }
  int64_t batch_size() const { return batch_size_; }
  /// Number of samples this rank serves per epoch.
  int64_t shard_size() const { return shard_size_; }
  /// Number of indices in batch b.
  int64_t batch_len(int64_t b) const;
  /// Writes the batch_len(b) indices of batch b to out.
  void batch_indices(int64_t b, int64_t* out) const;

  /// DistributedSampler's per-rank sample count for n samples over world_size ranks.
  static int64_t shard_size_for(int64_t n, int64_t world_size, bool drop_last);

 private:
  int64_t n_;
  int64_t batch_size_;
  bool shuffle_;
  Shard shard_;
  int64_t shard_size_;
  int64_t num_batches_;
  Permutation perm_;
};

}  // namespace stoker
