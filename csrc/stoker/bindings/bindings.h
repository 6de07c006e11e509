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

/// A `dltensor` capsule owning `managed`; if nobody consumes it, its destructor frees the tensor.
py::capsule to_capsule(DLManagedTensor* managed);

/// The DLPack type of a numpy dtype, or nullopt when torch cannot take it as is (object, strings,
/// structured, non-native byte order...).
std::optional<DType> dtype_of(const py::dtype& dt);

}  // namespace stoker::bindings
