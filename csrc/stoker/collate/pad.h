// Padding variable-length integer sequences into int64 rows [batch, width]: the copy behind PadCollate.
#pragma once

#include <cstddef>
#include <cstdint>

#include "stoker/common/dtype.h"

namespace stoker {

/// One sample's sequence under one key: `length` elements of `dtype`, `stride` bytes apart (any sign).
/// `data == nullptr` with a nonzero length marks a sequence its caller already wrote into its row (see
/// PadLayout::row): pad_batch then leaves those cells alone.
struct IntSequence {
  const uint8_t* data = nullptr;
  int64_t length = 0;
  int64_t stride = 8;
  DType dtype{DTypeCode::Int, 64};
};

/// True for the element types pad_batch reads: int8..int64, uint8..uint32 and bool.
bool pad_dtype_supported(DType t);

/// Where a padded batch lies in its block: `keys` outputs of int64 [batch, width], then, when `mask`, the
/// attention mask of the same shape, each output C-contiguous and `stride` cells after the one before (right
/// after it, stride == batch * width, unless the caller asks for gaps).
struct PadLayout {
  int64_t keys = 0;
  int64_t batch = 0;
  int64_t width = 0;
  bool left = false;
  bool mask = false;
  int64_t stride = 0;  // cells from one output's start to the next's, at least batch * width

  /// The layout for rows of `lengths` (one per sample): width is the longest, rounded up to a multiple of
  /// `multiple` when it is above 1; outputs right after one another. Returns false, leaving `out` alone, when
  /// the block's size would not fit in size_t.
  static bool make(const int64_t* lengths, int64_t batch, int64_t keys, int64_t multiple, bool left, bool mask,
                   PadLayout& out);

  int64_t outputs() const { return keys + (mask ? 1 : 0); }
  /// Bytes of the outputs together, gaps included (the last output's end).
  size_t bytes() const;
  /// bytes() rounded up to one of eight sizes per power of two (at least 4 KiB): the pool keeps blocks per
  /// exact size, and batches of nearby widths then share them.
  size_t block_bytes() const;
  /// Output `k` within the block at `base`.
  int64_t* output(int64_t* base, int64_t k) const { return base + k * stride; }
  /// Where output `k`'s row `i` puts its first token when the row holds `length` tokens.
  int64_t* row(int64_t* base, int64_t k, int64_t i, int64_t length) const {
    return output(base, k) + i * width + (left ? width - length : 0);
  }
};

/// Writes every output of `layout` into `out` (layout.bytes() bytes, 8-byte aligned; gaps between outputs are
/// left alone). Row i of output k holds seqs[k * batch + i], whose length must be lengths[i] (<= width), at the
/// row's right end with `left`, else at its start, and pad_values[k] in the other cells; the mask is 1 on
/// tokens and 0 elsewhere. Elements become int64 as a C cast makes them (uint64 above INT64_MAX wraps, bool is 0
/// or 1), which is numpy's unsafe cast.
/// Touches no Python object: callers may release the GIL around it.
void pad_batch(const PadLayout& layout, const IntSequence* seqs, const int64_t* lengths, const int64_t* pad_values,
               int64_t* out);

}  // namespace stoker
