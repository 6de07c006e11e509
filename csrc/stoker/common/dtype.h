// Element types as DLPack encodes them (code, bits): the one description shared by every stage.
#pragma once

#include <cstddef>
#include <cstdint>

namespace stoker {

/// DLPack type codes (DLDataTypeCode).
enum class DTypeCode : uint8_t { Int = 0, UInt = 1, Float = 2, BFloat = 4, Complex = 5, Bool = 6 };

/// One element type: a DLPack code and its width in bits (bool is stored as 8 bits).
struct DType {
  DTypeCode code = DTypeCode::UInt;
  uint8_t bits = 8;
  size_t itemsize() const { return bits / 8; }
  bool operator==(const DType& o) const { return code == o.code && bits == o.bits; }
};

/// True for the (code, bits) pairs stoker hands to torch.
bool dtype_supported(DType t);

}  // namespace stoker
