#include "stoker/collate/stack.h"

#include <cstring>

namespace stoker {
namespace {

// Copies a strided array of ndim dims into dst (C order). The innermost dimension is copied in one memcpy
// when its elements are adjacent.
void copy_strided(const uint8_t* src, const int64_t* shape, const int64_t* strides, int ndim,
                  size_t itemsize, uint8_t*& dst) {
  if (ndim == 0) {
    std::memcpy(dst, src, itemsize);
    dst += itemsize;
    return;
  }
  if (ndim == 1) {
    const int64_t n = shape[0];
    if (strides[0] == static_cast<int64_t>(itemsize)) {
      std::memcpy(dst, src, static_cast<size_t>(n) * itemsize);
      dst += static_cast<size_t>(n) * itemsize;
    } else {
      for (int64_t i = 0; i < n; ++i, dst += itemsize) std::memcpy(dst, src + i * strides[0], itemsize);
    }
    return;
  }
  for (int64_t i = 0; i < shape[0]; ++i)
    copy_strided(src + i * strides[0], shape + 1, strides + 1, ndim - 1, itemsize, dst);
}

}  // namespace

void stack_views(const std::vector<StridedView>& views, const std::vector<int64_t>& shape, size_t itemsize,
                 uint8_t* dst) {
  const int ndim = static_cast<int>(shape.size());
  size_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<size_t>(d);
  const size_t bytes = numel * itemsize;
  std::vector<int64_t> contiguous(ndim);
  {
    int64_t s = static_cast<int64_t>(itemsize);
    for (int d = ndim - 1; d >= 0; --d) {
      contiguous[d] = s;
      s *= shape[d];
    }
  }
  for (const StridedView& v : views) {
    bool plain = true;
    for (int d = 0; d < ndim; ++d)
      if (shape[d] > 1 && v.strides[d] != contiguous[d]) plain = false;
    if (plain || numel == 0) {
      if (bytes) std::memcpy(dst, v.data, bytes);
      dst += bytes;
    } else {
      copy_strided(v.data, shape.data(), v.strides.data(), ndim, itemsize, dst);
    }
  }
}

}  // namespace stoker
