#include "stoker/bindings/bindings.h"
#include "stoker/common/check.h"
#include "stoker/cuda/driver.h"
#include "stoker/device/kernels.h"

namespace stoker::bindings {

void register_cuda(py::module_& m) {
  m.def("cuda_status", [] {
    cuda::Status s;
    {
      ReleaseGil release;  // the first query loads the driver; cuInit can take a while
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
  m.def("cuda_available", &cuda::available, py::call_guard<ReleaseGil>(),
        "Whether the CUDA driver loaded, initialised and sees a device (False in a forked child).");
  m.def("cuda_primary_context", [](int device) {
    return reinterpret_cast<uintptr_t>(cuda::primary_context(device)->get());
  }, py::arg("device"), py::call_guard<ReleaseGil>(),
        "The handle of the device's primary context, retained once for the process.");
  m.def("cuda_active_devices", &cuda::active_devices,  // a few non-blocking driver calls: the GIL stays
        "The devices whose primary context is active in this process (empty when the driver cannot say).");
  m.def("cuda_current_context", [] { return reinterpret_cast<uintptr_t>(cuda::current_context()); },
        "The handle of the context current on the calling thread (0 when none).");

  m.def("cuda_kernels_available", &device::kernels_available, py::call_guard<ReleaseGil>(),
        "Whether this build embeds stoker's CUDA kernels (STOKER_CUDA) and the driver can launch them.");
  m.def("cuda_kernels_reason", &device::kernels_reason, py::call_guard<ReleaseGil>(),
        "Why the kernels are not available (empty when they are).");
  m.def("normalize_u8", [](int device, uintptr_t stream, uintptr_t in, uintptr_t out, int64_t images,
                           int64_t channels, int64_t height, int64_t width, bool channels_last,
                           const std::vector<float>& mean, const std::vector<float>& std, float scale, int type) {
    if (type < 0 || type > 2) throw stoker::ValueError("normalize_u8: type is 0 (float32), 1 (float16) or 2 (bfloat16)");
    ReleaseGil release;
    device::normalize_u8(device, stream, in, out, images, channels, height, width, channels_last, mean, std, scale,
                         static_cast<device::FloatType>(type));
  }, py::arg("device"), py::arg("stream"), py::arg("src"), py::arg("dst"), py::arg("images"), py::arg("channels"),
     py::arg("height"), py::arg("width"), py::arg("channels_last"), py::arg("mean"), py::arg("std"),
     py::arg("scale"), py::arg("type"),
     "Queues the normalise kernel on a stream (a CUstream handle): dst[n,c,h,w] = (src * scale - mean[c]) / "
     "std[c] from uint8 [N,C,H,W] (or [N,H,W,C] with channels_last) device memory.");

  py::class_<cuda::Event, std::shared_ptr<cuda::Event>>(m, "CudaEvent")
      .def(py::init([](int device) {
             ReleaseGil release;  // (inside the factory: pybind11 registers the new instance with the GIL)
             return std::make_shared<cuda::Event>(cuda::primary_context(device));
           }),
           py::arg("device"))
      .def_property_readonly("handle", [](const cuda::Event& e) { return reinterpret_cast<uintptr_t>(e.get()); })
      .def("record", [](const cuda::Event& e, uintptr_t stream) { e.record(reinterpret_cast<cuda::CUstream>(stream)); },
           py::arg("stream"), py::call_guard<ReleaseGil>(),
           "Records the event on a stream given by its handle (e.g. torch's current stream; 0 is the legacy one).")
      .def("query", &cuda::Event::query, py::call_guard<ReleaseGil>())
      .def("synchronize", &cuda::Event::synchronize, py::call_guard<ReleaseGil>())
      .def("block_stream", [](const cuda::Event& e, uintptr_t stream) {
        e.block_stream(reinterpret_cast<cuda::CUstream>(stream));
      }, py::arg("stream"), py::call_guard<ReleaseGil>(),
      "Makes later work on a foreign stream (a handle, e.g. torch's current stream) wait for this event.");

  py::class_<cuda::Stream, std::shared_ptr<cuda::Stream>>(m, "CudaStream")
      .def(py::init([](int device) {
             ReleaseGil release;  // (inside the factory: pybind11 registers the new instance with the GIL)
             return std::make_shared<cuda::Stream>(cuda::primary_context(device));
           }),
           py::arg("device"))
      .def_property_readonly("handle", [](const cuda::Stream& s) { return reinterpret_cast<uintptr_t>(s.get()); })
      .def_property_readonly("device", [](const cuda::Stream& s) { return s.context()->ordinal(); })
      .def("copy_to_device", [](const cuda::Stream& s, uintptr_t dst, uintptr_t src, size_t bytes) {
        s.copy_to_device(static_cast<cuda::CUdeviceptr>(dst), reinterpret_cast<const void*>(src), bytes);
      }, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::call_guard<ReleaseGil>(),
      "Queues a host-to-device copy; the caller keeps both buffers alive until an event recorded after it "
      "has completed.")
      .def("record", [](const cuda::Stream& s) {
        auto e = std::make_shared<cuda::Event>(s.context());
        e->record(s.get());
        return e;
      }, py::call_guard<ReleaseGil>(), "A new event recorded on this stream.")
      .def("wait", &cuda::Stream::wait, py::arg("event"), py::call_guard<ReleaseGil>());
}

}  // namespace stoker::bindings
