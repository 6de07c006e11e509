#include "stoker/source/array_source.h"

#include <algorithm>
#include <cstring>

#include "stoker/common/check.h"

namespace stoker {
namespace {

template <typename T>
void gather_fixed(const uint8_t* base, int64_t stride, const int64_t* idx, int64_t count, uint8_t* dst) {
  T* out = reinterpret_cast<T*>(dst);
  for (int64_t i = 0; i < count; ++i) std::memcpy(out + i, base + idx[i] * stride, sizeof(T));
}

void gather_rows(const Column& c, const int64_t* idx, int64_t count, uint8_t* dst) {
  const int64_t s = c.row_stride;
  switch (c.row_bytes) {
    case 0: return;  // rows of zero elements: nothing to copy (and possibly no data pointer)
    case 1: return gather_fixed<uint8_t>(c.base, s, idx, count, dst);
    case 2: return gather_fixed<uint16_t>(c.base, s, idx, count, dst);
    case 4: return gather_fixed<uint32_t>(c.base, s, idx, count, dst);
    case 8: return gather_fixed<uint64_t>(c.base, s, idx, count, dst);
    default: break;
  }
  // Rows are scattered: while copying row i, ask for every cache line of row i + kAhead (for rows up to
  // 4 KiB; longer rows are streamed well enough by the hardware prefetcher once started).
  constexpr int64_t kAhead = 4;
  const size_t n = c.row_bytes;
  const size_t lines = n <= 4096 ? (n + 63) / 64 : 1;
  auto prefetch_row = [&](int64_t i) {
    const uint8_t* row = c.base + idx[i] * s;
    for (size_t l = 0; l < lines; ++l) __builtin_prefetch(row + l * 64);
  };
  for (int64_t i = 0; i < std::min(kAhead, count); ++i) prefetch_row(i);
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) prefetch_row(i + kAhead);
    std::memcpy(dst + static_cast<size_t>(i) * n, c.base + idx[i] * s, n);
  }
}

}  // namespace

ArraySource::ArraySource(std::vector<Column> columns) : columns_(std::move(columns)) {
  STOKER_CHECK_AS(ValueError, !columns_.empty(), "an array dataset needs at least one column");
  rows_ = columns_[0].rows;
  for (const Column& c : columns_) {
    STOKER_CHECK_AS(ValueError, c.rows == rows_, "column '", c.name, "' has ", c.rows,
                    " rows but column '", columns_[0].name, "' has ", rows_,
                    ": every column needs the same number of rows");
    STOKER_CHECK_AS(TypeError, dtype_supported(c.dtype), "column '", c.name,
                    "' has an element type torch cannot hold (DLPack code ",
                    static_cast<int>(c.dtype.code), ", ", static_cast<int>(c.dtype.bits), " bits)");
    STOKER_CHECK_AS(ValueError, c.rows == 0 || c.row_bytes == 0 || c.base != nullptr, "column '",
                    c.name, "' has no data");
  }
}

size_t ArraySource::batch_layout(int64_t batch_size, std::vector<size_t>* offsets) const {
  offsets->clear();
  size_t total = 0;
  for (const Column& c : columns_) {
    offsets->push_back(total);
    total += (c.row_bytes * static_cast<size_t>(batch_size) + 63) / 64 * 64;
  }
  return total;
}

void ArraySource::normalize(int64_t* idx, int64_t count) const {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = idx[i];
    if (k >= 0 && k < rows_) continue;
    STOKER_CHECK_AS(IndexError, k < 0 && k >= -rows_, "index ", k,
                    " is out of range for a dataset of ", rows_, " samples");
    idx[i] = k + rows_;
  }
}

void ArraySource::gather(const int64_t* idx, int64_t count, uint8_t* dst,
                         const std::vector<size_t>& offsets) const {
  std::vector<int64_t> fixed;  // only when an index is negative
  for (int64_t i = 0; i < count; ++i) {
    if (idx[i] >= 0 && idx[i] < rows_) continue;
    fixed.assign(idx, idx + count);
    normalize(fixed.data(), count);
    break;
  }
  gather_part(fixed.empty() ? idx : fixed.data(), 0, count, dst, offsets);
}

void ArraySource::gather_part(const int64_t* idx, int64_t begin, int64_t end, uint8_t* dst,
                              const std::vector<size_t>& offsets) const {
  for (size_t c = 0; c < columns_.size(); ++c)
    gather_rows(columns_[c], idx + begin, end - begin,
                dst + offsets[c] + static_cast<size_t>(begin) * columns_[c].row_bytes);
}

}  // namespace stoker
