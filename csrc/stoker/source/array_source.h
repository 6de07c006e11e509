// The array source: column arrays whose rows are gathered by index straight into a batch buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "stoker/common/dtype.h"

namespace stoker {

/// One column: `rows` rows of `row_bytes` contiguous bytes, row r at base + r * row_stride (the stride
/// may be anything, negative included). The memory belongs to the caller and must outlive the source.
struct Column {
  std::string name;
  const uint8_t* base = nullptr;
  int64_t rows = 0;
  int64_t row_stride = 0;
  size_t row_bytes = 0;
  DType dtype;
  std::vector<int64_t> row_shape;
};

/// Gathers rows of several equally long columns. Thread-safe: it only reads.
class ArraySource {
 public:
  explicit ArraySource(std::vector<Column> columns);
  int64_t size() const { return rows_; }
  const std::vector<Column>& columns() const { return columns_; }
  /// Bytes one full batch of `batch_size` rows needs, each column 64-byte aligned; fills `offsets`.
  size_t batch_layout(int64_t batch_size, std::vector<size_t>* offsets) const;
  /// Copies rows `idx[0..count)` of every column c into dst + offsets[c]. Negative indices count from the
  /// end, as in Python; an index outside [-size, size) throws IndexError before anything is written.
  void gather(const int64_t* idx, int64_t count, uint8_t* dst, const std::vector<size_t>& offsets) const;
  /// Makes negative indices positive (counted from the end); IndexError for one outside [-size, size).
  void normalize(int64_t* idx, int64_t count) const;
  /// Copies rows idx[begin..end) of a batch laid out at `offsets` (batch_layout) to their places: row i of
  /// column c at dst + offsets[c] + i * row_bytes. The indices must be normalised (in [0, size)). Parts of one
  /// batch can be gathered by several threads at once.
  void gather_part(const int64_t* idx, int64_t begin, int64_t end, uint8_t* dst,
                   const std::vector<size_t>& offsets) const;

 private:
  std::vector<Column> columns_;
  int64_t rows_ = 0;
};

}  // namespace stoker
