#include "stoker/collate/pad.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "stoker/common/check.h"

namespace stoker {
namespace {

// Loads through memcpy: numpy arrays and tensors may sit at any byte address. The contiguous loop is the one
// compilers vectorise.
template <typename T>
void widen(const uint8_t* src, int64_t stride, int64_t n, int64_t* dst) {
  if (stride == static_cast<int64_t>(sizeof(T))) {
    for (int64_t j = 0; j < n; ++j) {
      T v;
      std::memcpy(&v, src + j * static_cast<int64_t>(sizeof(T)), sizeof(T));
      dst[j] = static_cast<int64_t>(v);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      T v;
      std::memcpy(&v, src + j * stride, sizeof(T));
      dst[j] = static_cast<int64_t>(v);
    }
  }
}

void widen_bool(const uint8_t* src, int64_t stride, int64_t n, int64_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j * stride] != 0;
}

void copy_sequence(const IntSequence& s, int64_t* dst) {
  const int64_t n = s.length;
  if (n == 0 || s.data == nullptr) return;
  const uint8_t* p = s.data;
  switch (s.dtype.code) {
    case DTypeCode::Bool:
      widen_bool(p, s.stride, n, dst);
      return;
    case DTypeCode::Int:
      switch (s.dtype.bits) {
        case 8: widen<int8_t>(p, s.stride, n, dst); return;
        case 16: widen<int16_t>(p, s.stride, n, dst); return;
        case 32: widen<int32_t>(p, s.stride, n, dst); return;
        case 64:
          if (s.stride == 8) {
            std::memcpy(dst, p, static_cast<size_t>(n) * 8);
          } else {
            widen<int64_t>(p, s.stride, n, dst);
          }
          return;
      }
      break;
    case DTypeCode::UInt:
      switch (s.dtype.bits) {
        case 8: widen<uint8_t>(p, s.stride, n, dst); return;
        case 16: widen<uint16_t>(p, s.stride, n, dst); return;
        case 32: widen<uint32_t>(p, s.stride, n, dst); return;
      }
      break;
    default:
      break;
  }
  STOKER_CHECK(false, "pad_batch: unsupported element type (", static_cast<int>(s.dtype.code), ", ",
               static_cast<int>(s.dtype.bits), ")");
}

}  // namespace

bool pad_dtype_supported(DType t) {
  // The integer and bool types of the common table: padding writes int64 ids, never floats. Not uint64, whose
  // values past 2**63 do not fit: the caller's own path checks them.
  return dtype_supported(t) && (t.code == DTypeCode::Bool || t.code == DTypeCode::Int ||
                                (t.code == DTypeCode::UInt && t.bits < 64));
}

bool PadLayout::make(const int64_t* lengths, int64_t batch, int64_t keys, int64_t multiple, bool left, bool mask,
                     PadLayout& out) {
  int64_t width = 0;
  for (int64_t i = 0; i < batch; ++i) width = std::max(width, lengths[i]);
  if (multiple > 1 && width % multiple) {
    if (width > std::numeric_limits<int64_t>::max() - multiple) return false;
    width += multiple - width % multiple;
  }
  // The whole block, with room to round it up (block_bytes adds at most an eighth), must be addressable.
  const int64_t outputs = keys + (mask ? 1 : 0);
  int64_t per_output = 0, cells = 0, bytes = 0;
  if (__builtin_mul_overflow(batch, width, &per_output) || __builtin_mul_overflow(per_output, outputs, &cells) ||
      __builtin_mul_overflow(cells, int64_t{8}, &bytes) || bytes > std::numeric_limits<int64_t>::max() / 2)
    return false;
  out = PadLayout{keys, batch, width, left, mask, per_output};
  return true;
}

size_t PadLayout::bytes() const {
  if (outputs() == 0) return 0;
  return (static_cast<size_t>(outputs() - 1) * static_cast<size_t>(stride) +
          static_cast<size_t>(batch) * static_cast<size_t>(width)) * 8;
}

size_t PadLayout::block_bytes() const {
  constexpr size_t kMin = 4096;
  const size_t b = bytes();
  if (b <= kMin) return kMin;
  size_t top = 1;
  while (top <= b / 2) top *= 2;  // the largest power of two <= b
  const size_t step = std::max(kMin, top / 8);
  return (b + step - 1) / step * step;
}

void pad_batch(const PadLayout& layout, const IntSequence* seqs, const int64_t* lengths, const int64_t* pad_values,
               int64_t* out) {
  const int64_t batch = layout.batch, width = layout.width;
  for (int64_t i = 0; i < batch; ++i)
    STOKER_CHECK(lengths[i] >= 0 && lengths[i] <= width, "pad_batch: row ", i, " has ", lengths[i],
                 " tokens for a width of ", width);
  for (int64_t k = 0; k < layout.keys; ++k) {
    const int64_t pad = pad_values[k];
    for (int64_t i = 0; i < batch; ++i) {
      const IntSequence& s = seqs[k * batch + i];
      const int64_t n = lengths[i];
      STOKER_CHECK(s.length == n, "pad_batch: output ", k, " row ", i, " has ", s.length, " tokens, not ", n);
      int64_t* row = layout.output(out, k) + i * width;
      int64_t* tokens = layout.row(out, k, i, n);
      std::fill(row, tokens, pad);
      std::fill(tokens + n, row + width, pad);
      copy_sequence(s, tokens);
    }
  }
  if (layout.mask) {
    for (int64_t i = 0; i < batch; ++i) {
      int64_t* row = layout.output(out, layout.keys) + i * width;
      int64_t* tokens = layout.row(out, layout.keys, i, lengths[i]);
      std::fill(row, tokens, int64_t{0});
      std::fill(tokens, tokens + lengths[i], int64_t{1});
      std::fill(tokens + lengths[i], row + width, int64_t{0});
    }
  }
}

}  // namespace stoker
