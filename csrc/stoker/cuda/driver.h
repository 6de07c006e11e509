// The CUDA driver API, reached at run time: libcuda.so.1 is dlopen'ed once, at the first query, and every entry
// point is resolved through cuGetProcAddress at the ABI version pinned below. CUDA's types are declared here:
// building needs no CUDA headers, and the extension links neither libcuda nor libcudart. A machine without a
// driver or a GPU gets available() == false, never a crash.
//
// Contexts: stoker uses each device's primary context, the one torch's runtime uses, made current on the
// threads that call the driver. Streams and events belong to it; nothing creates a private context.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace stoker::cuda {

// ---- CUDA's types and constants, as the driver's ABI defines them ----------------------------------------
using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUdeviceptr = unsigned long long;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr CUresult CUDA_ERROR_DEINITIALIZED = 4;
constexpr CUresult CUDA_ERROR_NO_DEVICE = 100;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;

constexpr unsigned CU_MEMHOSTALLOC_PORTABLE = 0x01;     // pinned for every context, not only the allocating one
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x01;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x01;       // no implicit synchronisation with the legacy stream 0
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x02;

/// The oldest driver stoker accepts (CUDA 11.0). Drivers from 11.3 on resolve entry points through
/// cuGetProcAddress; 11.0-11.2 lack it and are served by dlsym on the exported, versioned names.
constexpr int kMinDriverVersion = 11000;

/// The driver's entry points, each resolved at the ABI version noted beside it (1000 * major + 10 * minor):
/// a newer driver keeps serving these exact signatures and behaviours.
struct Api {
  CUresult (*cuGetErrorName)(CUresult error, const char** name);                       // 6000
  CUresult (*cuGetErrorString)(CUresult error, const char** text);                     // 6000
  CUresult (*cuInit)(unsigned flags);                                                  // 2000
  CUresult (*cuDriverGetVersion)(int* version);                                        // 2020
  CUresult (*cuDeviceGetCount)(int* count);                                            // 2000
  CUresult (*cuDeviceGet)(CUdevice* device, int ordinal);                              // 2000
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext* ctx, CUdevice device);               // 7000
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice device);                              // 11000 (_v2)
  CUresult (*cuCtxSetCurrent)(CUcontext ctx);                                          // 4000
  CUresult (*cuCtxGetCurrent)(CUcontext* ctx);                                         // 4000
  CUresult (*cuMemHostAlloc)(void** ptr, size_t bytes, unsigned flags);                // 2020
  CUresult (*cuMemFreeHost)(void* ptr);                                                // 2000
  CUresult (*cuMemHostRegister)(void* ptr, size_t bytes, unsigned flags);              // 6050 (_v2)
  CUresult (*cuMemHostUnregister)(void* ptr);                                          // 4000
  CUresult (*cuStreamCreate)(CUstream* stream, unsigned flags);                        // 2000
  CUresult (*cuStreamDestroy)(CUstream stream);                                        // 4000 (_v2)
  CUresult (*cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned flags);       // 3020
  CUresult (*cuEventCreate)(CUevent* event, unsigned flags);                           // 2000
  CUresult (*cuEventRecord)(CUevent event, CUstream stream);                           // 2000
  CUresult (*cuEventQuery)(CUevent event);                                             // 2000
  CUresult (*cuEventSynchronize)(CUevent event);                                       // 2000
  CUresult (*cuEventDestroy)(CUevent event);                                           // 4000 (_v2)
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream);  // 3020 (_v2)
  // Optional (kernels, see device/kernels.h): null when the driver does not provide them, which leaves CUDA
  // available and only the kernels off.
  CUresult (*cuModuleLoadData)(CUmodule* module, const void* image);                   // 2000
  CUresult (*cuModuleGetFunction)(CUfunction* fn, CUmodule module, const char* name);   // 2000
  CUresult (*cuLaunchKernel)(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared_bytes, CUstream stream, void** params,
                             void** extra);                                            // 4000
  // Optional: which devices' primary contexts are active (see active_devices).
  CUresult (*cuDevicePrimaryCtxGetState)(CUdevice dev, unsigned* flags, int* active);  // 7000
  // Optional: the calling thread's stream-capture mode (a CUstreamCaptureMode), exchanged (see RelaxedCapture).
  CUresult (*cuThreadExchangeStreamCaptureMode)(int* mode);                            // 10010
};

constexpr int CU_STREAM_CAPTURE_MODE_RELAXED = 2;

/// What loading the driver found, filled once per process at the first query.
struct Status {
  bool available = false;     // loaded, cuInit succeeded, at least one device, and not a forked child
  std::string library;        // what was passed to dlopen (STOKER_LIBCUDA, else libcuda.so.1)
  int driver_version = 0;     // cuDriverGetVersion, e.g. 12040; 0 when the library did not load
  int device_count = 0;
  bool proc_address = false;  // entry points came from cuGetProcAddress (false: dlsym, or not loaded)
  std::string reason;         // why CUDA is not available; empty when it is
};

/// A failed driver call (a Python RuntimeError). The message names the call and CUDA's error name.
class CudaError : public std::runtime_error {
 public:
  CudaError(CUresult code, const std::string& message) : std::runtime_error(message), code_(code) {}
  CUresult code() const { return code_; }

 private:
  CUresult code_;
};

/// The driver's state; loads it on the first call (thread-safe, once per process). Never throws. In a process
/// forked from the one that loaded the driver, `available` is false: CUDA does not survive fork().
Status status();
/// status().available, cheaply.
bool available();
/// The entry points. Throws CudaError carrying status().reason when CUDA is not available.
const Api& api();
/// The ordinals of the devices whose primary context is active in this process (the GPUs torch, or anyone,
/// has work on); empty when CUDA is not available or the driver cannot say.
std::vector<int> active_devices();

/// "CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)", or "CUDA error 12345" for a code the driver
/// cannot name.
std::string error_text(CUresult result);
/// Throws CudaError "<call> failed[ (<what>)]: <error_text>" unless `result` is CUDA_SUCCESS.
void check(CUresult result, const char* call, const std::string& what = {});
/// The context current on the calling thread (nullptr when none). Throws CudaError.
CUcontext current_context();

// ---- RAII owners -----------------------------------------------------------------------------------------

/// A retained primary context of one device (the context torch's runtime uses); released on destruction.
class PrimaryContext {
 public:
  /// Throws stoker::ValueError for an ordinal outside [0, device_count), CudaError when the driver fails.
  explicit PrimaryContext(int ordinal);
  ~PrimaryContext();
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;

  CUcontext get() const { return ctx_; }
  int ordinal() const { return ordinal_; }
  /// Makes this context current on the calling thread (a no-op when it already is). Native threads that call
  /// the driver do this once, at their start.
  void make_current() const;

 private:
  int ordinal_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
};

/// The process's primary context of `ordinal`, retained once per device and shared by every user. The retain
/// is kept until the process ends: releasing it during interpreter exit would race the driver's own teardown.
std::shared_ptr<PrimaryContext> primary_context(int ordinal);

/// Makes a context current on this thread for a scope and restores the thread's previous one after: for work
/// done on threads stoker does not own (a tensor's deleter runs on whichever thread frees it). The thread's
/// stream-capture mode is relaxed for the scope too, and put back after: while a user's CUDA graph is captured
/// in the global mode (torch.cuda.graph's default), a call the driver deems unsafe (page-locking, unlocking,
/// perhaps querying an event) would fail on any thread and invalidate the capture, and stoker makes such
/// calls on its own threads at any moment.
class ScopedContext {
 public:
  explicit ScopedContext(const PrimaryContext& ctx);
  ~ScopedContext();
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;

 private:
  CUcontext previous_ = nullptr;
  bool switched_ = false;
  int capture_mode_ = CU_STREAM_CAPTURE_MODE_RELAXED;  // the thread's own, while exchanged
  bool exchanged_ = false;
};

/// Page-locked host memory from cuMemHostAlloc (portable: pinned for every context); freed on destruction.
class PinnedBuffer {
 public:
  PinnedBuffer(std::shared_ptr<PrimaryContext> ctx, size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  std::shared_ptr<PrimaryContext> ctx_;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

/// Allocates `bytes` of portable page-locked memory with `ctx` current (any thread). Throws CudaError.
void* alloc_pinned(const PrimaryContext& ctx, size_t bytes);
/// Frees memory from alloc_pinned (any thread). Never throws: returns the driver's result, which a destructor
/// can only drop (CUDA_ERROR_DEINITIALIZED during process exit is expected). Does nothing in a forked child,
/// which has no CUDA context: there the memory is at most a copy of the parent's pages, and the driver may
/// leave it unmapped altogether (it can keep page-locked memory out of forks): a child must not touch it.
CUresult free_pinned(const PrimaryContext& ctx, void* ptr) noexcept;

/// Page-locks existing host memory (cuMemHostRegister, portable) once; unregistered on destruction, which
/// must come before the memory is unmapped.
class HostRegistration {
 public:
  HostRegistration(std::shared_ptr<PrimaryContext> ctx, void* ptr, size_t bytes);
  ~HostRegistration();
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  std::shared_ptr<PrimaryContext> ctx_;
  void* ptr_;
  size_t bytes_;
};

class Event;

/// A non-blocking stream of a primary context: work on it does not wait for, nor hold up, the legacy default
/// stream. Destroyed (after its queued work, as the driver does) on destruction.
class Stream {
 public:
  explicit Stream(std::shared_ptr<PrimaryContext> ctx);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  CUstream get() const { return stream_; }
  const std::shared_ptr<PrimaryContext>& context() const { return ctx_; }
  /// Queues a copy of `bytes` from host `src` to device `dst`. Asynchronous only when `src` is page-locked;
  /// both buffers must stay alive until an event recorded after it has completed.
  void copy_to_device(CUdeviceptr dst, const void* src, size_t bytes) const;
  /// Makes later work on this stream wait for `event` (on the device; the host does not wait).
  void wait(const Event& event) const;

 private:
  std::shared_ptr<PrimaryContext> ctx_;
  CUstream stream_ = nullptr;
};

/// An event without timing: recorded on a stream, it completes when the work queued before it has.
class Event {
 public:
  explicit Event(std::shared_ptr<PrimaryContext> ctx);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  CUevent get() const { return event_; }
  const std::shared_ptr<PrimaryContext>& context() const { return ctx_; }
  /// Records the event on `stream` (a stoker Stream's handle or a foreign one, e.g. torch's current stream).
  void record(CUstream stream) const;
  /// True once the recorded work has completed; never blocks.
  bool query() const;
  /// Blocks the calling thread until the recorded work has completed.
  void synchronize() const;
  /// Makes later work on a foreign stream (torch's current stream) wait for this event, without blocking.
  void block_stream(CUstream stream) const;

 private:
  std::shared_ptr<PrimaryContext> ctx_;
  CUevent event_ = nullptr;
};

}  // namespace stoker::cuda
