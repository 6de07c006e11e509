#include "stoker/common/dlpack.h"

namespace stoker {
namespace {

struct Export {
  DLManagedTensor managed;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  std::shared_ptr<void> owner;
};

void delete_export(DLManagedTensor* self) { delete static_cast<Export*>(self->manager_ctx); }

}  // namespace

DLManagedTensor* export_dlpack(std::shared_ptr<void> owner, void* data, DType dtype,
                               const std::vector<int64_t>& shape) {
  auto* e = new Export{};
  e->shape = shape;
  e->strides.assign(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i)
    e->strides[i] = e->strides[i + 1] * (shape[i + 1] > 0 ? shape[i + 1] : 1);
  e->owner = std::move(owner);
  DLTensor& t = e->managed.dl_tensor;
  t.data = data;
  t.device = DLDevice{1, 0};
  t.ndim = static_cast<int32_t>(e->shape.size());
  t.dtype = DLDataType{static_cast<uint8_t>(dtype.code), dtype.bits, 1};
  t.shape = e->shape.data();
  t.strides = e->strides.data();
  t.byte_offset = 0;
  e->managed.manager_ctx = e;
  e->managed.deleter = &delete_export;
  return &e->managed;
}

}  // namespace stoker
