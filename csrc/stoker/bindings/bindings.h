// Shared helpers of the binding files. Only files in bindings/ include pybind11.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <vector>

#include "stoker/common/dlpack.h"

namespace stoker::bindings {
namespace py = pybind11;

void register_errors(py::module_& m);
void register_sampler(py::module_& m);
void register_pool(py::module_& m);
void register_pipeline(py::module_& m);
void register_collate(py::module_& m);
void register_packing(py::module_& m);
void register_cuda(py::module_& m);

/// Lets go of the GIL for its scope, as py::gil_scoped_release does, but safe at interpreter exit. A (daemon)
/// thread taking the GIL back once the interpreter finalizes is ended by pthread_exit, an unwind that
/// py::gil_scoped_release's noexcept destructor turned into an abort of the process ("terminate called
/// without an active exception"). Here:
/// * a thread (not the main one) that comes back once finalizing has begun sleeps for good instead, as
///   CPython 3.14 makes it: it never unwinds (the process is ending);
/// * one already waiting for the GIL when it begins (the usual case) is unwound: this destructor may throw,
///   and pybind11's dispatcher lets the unwind through. The scope's Python references are then dropped
///   without the GIL while the main thread finalizes (not seen to fail; the abort was certain).
/// Every binding that lets go of the GIL uses this.
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ~ReleaseGil() noexcept(false);
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

/// Records which thread is the main one (it finalizes the interpreter, and is never parked by ReleaseGil);
/// called once, with the GIL, when the module is imported.
void note_main_thread();

/// A `dltensor` capsule owning `managed`; if nobody consumes it, its destructor frees the tensor.
py::capsule to_capsule(DLManagedTensor* managed);

/// The DLPack type of a numpy dtype, or nullopt when torch cannot take it as is (object, strings,
/// structured, non-native byte order...).
std::optional<DType> dtype_of(const py::dtype& dt);

}  // namespace stoker::bindings
