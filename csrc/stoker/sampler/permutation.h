// A random permutation of [0, n) that is a pure function of (n, seed, epoch), any position of which is
// computed without the positions before it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace stoker {

/// Bijection of [0, n) keyed by (seed, epoch).
///
/// Up to kTableMax elements it is a uniform Fisher-Yates shuffle whose random numbers are a counter-based
/// function of (seed, epoch, step), stored as a table (4 bytes per element). Past that it is an unbalanced
/// 8-round Feistel network over the smallest power of two >= n, restricted to [0, n) by cycle walking: no
/// table, O(1) per position. Feistel networks are far from uniform on tiny domains (they only reach even
/// permutations), which is why small datasets get the table.
class Permutation {
 public:
  static constexpr int64_t kTableMax = int64_t{1} << 20;

  Permutation(int64_t n, uint64_t seed, uint64_t epoch);
  /// The value at position `pos` (0 <= pos < n).
  int64_t operator()(int64_t pos) const {
    if (!table_.empty()) return table_[static_cast<size_t>(pos)];
    uint64_t v = static_cast<uint64_t>(pos);
    do {
      v = encrypt(v);
    } while (v >= n_);
    return static_cast<int64_t>(v);
  }
  int64_t size() const { return static_cast<int64_t>(n_); }

 private:
  static constexpr int kRounds = 8;
  uint64_t encrypt(uint64_t v) const;

  uint64_t n_;
  int bits_ = 0;
  int lo_bits_ = 0;  // width of the half that enters the round function in round 0
  std::array<uint64_t, kRounds> keys_{};
  std::vector<uint32_t> table_;
};

/// splitmix64's finaliser: a fast 64-bit mixing function.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace stoker
