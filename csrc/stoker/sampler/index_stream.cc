#include "stoker/sampler/index_stream.h"

#include <algorithm>

#include "stoker/common/check.h"

namespace stoker {

IndexStream::IndexStream(int64_t n, int64_t batch_size, bool drop_last, bool shuffle, uint64_t seed,
                         uint64_t epoch)
    : n_(n), batch_size_(batch_size), shuffle_(shuffle), perm_(n, seed, epoch) {
  STOKER_CHECK_AS(ValueError, n >= 0, "dataset size must be non-negative, got ", n);
  STOKER_CHECK_AS(ValueError, batch_size > 0, "batch_size must be positive, got ", batch_size);
  num_batches_ = drop_last ? n / batch_size : (n + batch_size - 1) / batch_size;
}

int64_t IndexStream::batch_len(int64_t b) const {
  STOKER_CHECK_AS(IndexError, b >= 0 && b < num_batches_, "batch ", b, " out of range [0, ",
                  num_batches_, ")");
  return std::min(batch_size_, n_ - b * batch_size_);
}

void IndexStream::batch_indices(int64_t b, int64_t* out) const {
  const int64_t len = batch_len(b);
  const int64_t first = b * batch_size_;
  if (shuffle_) {
    for (int64_t i = 0; i < len; ++i) out[i] = perm_(first + i);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = first + i;
  }
}

}  // namespace stoker
