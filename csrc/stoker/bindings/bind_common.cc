#include "stoker/common/check.h"
#include "stoker/bindings/bindings.h"

#include <pythread.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace stoker::bindings {
namespace {

std::atomic<unsigned long> main_thread_ident{0};

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

constexpr const char* kCapsuleName = "dltensor";

void free_unconsumed(PyObject* capsule) {
  // torch renames a consumed capsule to "used_dltensor" and owns the tensor from then on.
  if (PyCapsule_IsValid(capsule, kCapsuleName)) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleName));
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  }
}

}  // namespace

void note_main_thread() {
  main_thread_ident.store(
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>());
}

ReleaseGil::~ReleaseGil() noexcept(false) {
  if (interpreter_finalizing() && PyThread_get_thread_ident() != main_thread_ident.load()) {
    for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
  }
  PyEval_RestoreThread(state_);
}

py::capsule to_capsule(DLManagedTensor* managed) {
  PyObject* cap = PyCapsule_New(managed, kCapsuleName, &free_unconsumed);
  if (cap == nullptr) {
    managed->deleter(managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

std::optional<DType> dtype_of(const py::dtype& dt) {
  const char order = dt.byteorder();
  if (order == '>') return std::nullopt;  // stoker runs on little-endian machines only
  const auto bits = static_cast<uint8_t>(dt.itemsize() * 8);
  DType t;
  t.bits = bits;
  switch (dt.kind()) {
    case 'b': t.code = DTypeCode::Bool; break;
    case 'i': t.code = DTypeCode::Int; break;
    case 'u': t.code = DTypeCode::UInt; break;
    case 'f': t.code = DTypeCode::Float; break;
    case 'c': t.code = DTypeCode::Complex; break;
    default: return std::nullopt;
  }
  if (!dtype_supported(t)) return std::nullopt;
  return t;
}

void register_errors(py::module_& m) {
  (void)m;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what());
    } catch (const TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
}

}  // namespace stoker::bindings
