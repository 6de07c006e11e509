// Stacking samples into one batch buffer: the copy at the heart of native collation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace stoker {

/// One sample's array: its data, shape and byte strides (any sign).
struct StridedView {
  const uint8_t* data = nullptr;
  std::vector<int64_t> strides;
};

/// Copies each view (all of `shape`, elements of `itemsize` bytes) into dst, one after the other, each
/// C-contiguous. Views whose layout is already C-contiguous are copied with one memcpy.
void stack_views(const std::vector<StridedView>& views, const std::vector<int64_t>& shape, size_t itemsize,
                 uint8_t* dst);

}  // namespace stoker
