#include "stoker/sampler/index_stream.h"

#include <algorithm>

#include "stoker/common/check.h"

namespace stoker {

int64_t IndexStream::shard_size_for(int64_t n, int64_t world_size, bool drop_last) {
  if (world_size == 1) return n;
  if (drop_last && n % world_size != 0) return n < world_size ? 0 : n / world_size;  // ceil((n-W)/W)
  return (n + world_size - 1) / world_size;
}

IndexStream::IndexStream(int64_t n, int64_t batch_size, bool drop_last, bool shuffle, uint64_t seed,
                         uint64_t epoch, Shard shard)
    : n_(n), batch_size_(batch_size), shuffle_(shuffle), shard_(shard),
      perm_(shuffle ? n : 0, seed, epoch) {  // no table to build for an order that is not shuffled
  STOKER_CHECK_AS(ValueError, n >= 0, "dataset size must be non-negative, got ", n);
  STOKER_CHECK_AS(ValueError, batch_size > 0, "batch_size must be positive, got ", batch_size);
  STOKER_CHECK_AS(ValueError, shard.world_size > 0, "world_size must be positive, got ", shard.world_size);
  STOKER_CHECK_AS(ValueError, shard.rank >= 0 && shard.rank < shard.world_size, "Invalid rank ", shard.rank,
                  ", rank should be in the interval [0, ", shard.world_size - 1, "]");
  shard_size_ = shard_size_for(n, shard.world_size, drop_last);
  num_batches_ = drop_last ? shard_size_ / batch_size : (shard_size_ + batch_size - 1) / batch_size;
}

int64_t IndexStream::batch_len(int64_t b) const {
  STOKER_CHECK_AS(IndexError, b >= 0 && b < num_batches_, "batch ", b, " out of range [0, ",
                  num_batches_, ")");
  return std::min(batch_size_, shard_size_ - b * batch_size_);
}

void IndexStream::batch_indices(int64_t b, int64_t* out) const {
  const int64_t len = batch_len(b);
  const int64_t first = b * batch_size_;
  if (shard_.world_size == 1) {
    if (shuffle_) {
      for (int64_t i = 0; i < len; ++i) out[i] = perm_(first + i);
    } else {
      for (int64_t i = 0; i < len; ++i) out[i] = first + i;
    }
    return;
  }
  // Shard position k is position rank + k*W of the order padded by repetition: (rank + k*W) mod n.
  const int64_t w = shard_.world_size;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t pos = (shard_.rank + (first + i) * w) % n_;
    out[i] = shuffle_ ? perm_(pos) : pos;
  }
}

}  // namespace stoker
