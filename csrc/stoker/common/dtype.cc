#include "stoker/common/dtype.h"

namespace stoker {

bool dtype_supported(DType t) {
  switch (t.code) {
    case DTypeCode::Bool:
      return t.bits == 8;
    case DTypeCode::Int:
    case DTypeCode::UInt:
      return t.bits == 8 || t.bits == 16 || t.bits == 32 || t.bits == 64;
    case DTypeCode::Float:
      return t.bits == 16 || t.bits == 32 || t.bits == 64;
    case DTypeCode::BFloat:
      return t.bits == 16;
    case DTypeCode::Complex:
      return t.bits == 64 || t.bits == 128;
  }
  return false;
}

}  // namespace stoker
