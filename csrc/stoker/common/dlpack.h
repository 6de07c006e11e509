// The DLPack ABI (unversioned `dltensor` capsule, the layout every torch 2.x reads), written from the
// published specification, and the one way stoker exports host memory through it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "stoker/common/dtype.h"

extern "C" {
struct DLDevice {
  int32_t device_type;  // 1 = kDLCPU, 3 = kDLCUDAHost (page-locked host memory)
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be null for C-contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
}

namespace stoker {

/// Wraps `data` (C-contiguous, of `shape` and `dtype`) as a DLManagedTensor that keeps `owner` alive until
/// its deleter runs. The deleter needs no lock and no GIL: torch may call it from any thread.
DLManagedTensor* export_dlpack(std::shared_ptr<void> owner, void* data, DType dtype,
                               const std::vector<int64_t>& shape);

}  // namespace stoker
