#include "stoker/sampler/permutation.h"

#include <utility>

namespace stoker {

Permutation::Permutation(int64_t n, uint64_t seed, uint64_t epoch) : n_(n > 0 ? n : 0) {
  while (bits_ < 63 && (uint64_t{1} << bits_) < n_) ++bits_;
  lo_bits_ = bits_ - bits_ / 2;
  uint64_t k = mix64(seed ^ 0x5851f42d4c957f2dULL) ^ mix64(epoch + 0x9e3779b97f4a7c15ULL);
  for (int r = 0; r < kRounds; ++r) {
    k = mix64(k + 0x9e3779b97f4a7c15ULL * (r + 1));
    keys_[r] = k;
  }
  if (n_ > 1 && static_cast<int64_t>(n_) <= kTableMax) {
    // Fisher-Yates, drawing j uniformly in [0, i] from the counter (key, i) by a 64x64->128 multiply.
    table_.resize(n_);
    for (uint64_t i = 0; i < n_; ++i) table_[i] = static_cast<uint32_t>(i);
    const uint64_t key = mix64(k ^ 0xd1b54a32d192ed03ULL);
    for (uint64_t i = n_ - 1; i > 0; --i) {
      const uint64_t r = mix64(key + i * 0x9e3779b97f4a7c15ULL);
      const auto j = static_cast<uint64_t>((static_cast<unsigned __int128>(r) * (i + 1)) >> 64);
      std::swap(table_[i], table_[j]);
    }
  }
}

uint64_t Permutation::encrypt(uint64_t v) const {
  // State v = (hi : bits_-lo bits, lo : lo bits). Each round maps it to (lo, hi ^ F(lo)); the widths swap,
  // and every round is invertible, so the composition is a bijection of [0, 2^bits_).
  int lo = lo_bits_;
  for (int r = 0; r < kRounds; ++r) {
    const int hi = bits_ - lo;
    const uint64_t lo_mask = (uint64_t{1} << lo) - 1;
    const uint64_t hi_mask = (uint64_t{1} << hi) - 1;
    const uint64_t L = v >> lo;
    const uint64_t R = v & lo_mask;
    const uint64_t f = mix64(R ^ keys_[r]) & hi_mask;
    v = (R << hi) | (L ^ f);
    lo = hi;
  }
  return v;
}

}  // namespace stoker
