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

/// Lets go of the GIL for its scope, as py::gil_scoped_release does, except that taking it back may unwind: a
/// (daemon) thread that comes back once the interpreter is finalizing is ended by pthread_exit as it takes the
/// GIL, an unwind that a noexcept destructor (py::gil_scoped_release's) turns into an abort of the process
/// ("terminate called without an active exception"); here it passes on to pybind11's dispatcher, which lets it
/// through, and the thread ends as a daemon thread in Python code does. Every binding that lets go of the GIL
/// uses this.
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ~ReleaseGil() noexcept(false) { PyEval_RestoreThread(state_); }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

/// A `dltensor` capsule owning `managed`; if nobody consumes it, its destructor frees the tensor.
py::capsule to_capsule(DLManagedTensor* managed);

/// The DLPack type of a numpy dtype, or nullopt when torch cannot take it as is (object, strings,
/// structured, non-native byte order...).
std::optional<DType> dtype_of(const py::dtype& dt);

}  // namespace stoker::bindings
