#include "stoker/bindings/bindings.h"
#include "stoker/cuda/driver.h"

namespace stoker::bindings {

void register_cuda(py::module_& m) {
  m.def("cuda_status", [] {
    cuda::Status s;
    {
      py::gil_scoped_release release;  // the first query loads the driver; cuInit can take a while
      s = cuda::status();
    }
    py::dict d;
    d["available"] = s.available;
    d["library"] = s.library;
    d["driver_version"] = s.driver_version;
    d["device_count"] = s.device_count;
    d["proc_address"] = s.proc_address;
    d["reason"] = s.reason;
    return d;
  }, "The CUDA driver as stoker found it (loaded once, at the first query); never raises.");
  m.def("cuda_available", &cuda::available, py::call_guard<py::gil_scoped_release>(),
        "Whether the CUDA driver loaded, initialised and sees a device (False in a forked child).");
  m.def("cuda_primary_context", [](int device) {
    return reinterpret_cast<uintptr_t>(cuda::primary_context(device)->get());
  }, py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "The handle of the device's primary context, retained once for the process.");
  m.def("cuda_current_context", [] { return reinterpret_cast<uintptr_t>(cuda::current_context()); },
        "The handle of the context current on the calling thread (0 when none).");

  py::class_<cuda::Event, std::shared_ptr<cuda::Event>>(m, "CudaEvent")
      .def(py::init([](int device) { return std::make_shared<cuda::Event>(cuda::primary_context(device)); }),
           py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("handle", [](const cuda::Event& e) { return reinterpret_cast<uintptr_t>(e.get()); })
      .def("record", [](const cuda::Event& e, uintptr_t stream) { e.record(reinterpret_cast<cuda::CUstream>(stream)); },
           py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
           "Records the event on a stream given by its handle (e.g. torch's current stream; 0 is the legacy one).")
      .def("query", &cuda::Event::query, py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &cuda::Event::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("block_stream", [](const cuda::Event& e, uintptr_t stream) {
        e.block_stream(reinterpret_cast<cuda::CUstream>(stream));
      }, py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Makes later work on a foreign stream (a handle, e.g. torch's current stream) wait for this event.");

  py::class_<cuda::Stream, std::shared_ptr<cuda::Stream>>(m, "CudaStream")
      .def(py::init([](int device) { return std::make_shared<cuda::Stream>(cuda::primary_context(device)); }),
           py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("handle", [](const cuda::Stream& s) { return reinterpret_cast<uintptr_t>(s.get()); })
      .def_property_readonly("device", [](const cuda::Stream& s) { return s.context()->ordinal(); })
      .def("copy_to_device", [](const cuda::Stream& s, uintptr_t dst, uintptr_t src, size_t bytes) {
        s.copy_to_device(static_cast<cuda::CUdeviceptr>(dst), reinterpret_cast<const void*>(src), bytes);
      }, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::call_guard<py::gil_scoped_release>(),
      "Queues a host-to-device copy; the caller keeps both buffers alive until an event recorded after it "
      "has completed.")
      .def("record", [](const cuda::Stream& s) {
        auto e = std::make_shared<cuda::Event>(s.context());
        e->record(s.get());
        return e;
      }, py::call_guard<py::gil_scoped_release>(), "A new event recorded on this stream.")
      .def("wait", &cuda::Stream::wait, py::arg("event"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace stoker::bindings
