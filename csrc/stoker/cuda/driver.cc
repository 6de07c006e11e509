#include "stoker/cuda/driver.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "stoker/common/check.h"

namespace stoker::cuda {
namespace {

// cuGetProcAddress: the 4-argument form (drivers from 11.3 on) and the 12.0 form that also reports why a
// symbol was not found. Both are exported by every driver since 12.0; either resolves the same entry points.
using GetProcAddressV1 = CUresult (*)(const char* symbol, void** fn, int cuda_version, uint64_t flags);
using GetProcAddressV2 = CUresult (*)(const char* symbol, void** fn, int cuda_version, uint64_t flags,
                                      int* symbol_status);
using DriverGetVersion = CUresult (*)(int* version);

// Resolve the variants whose streams are the legacy default stream's (as a program built without
// --default-stream per-thread sees them): torch's stream 0 is the legacy stream.
constexpr uint64_t CU_GET_PROC_ADDRESS_LEGACY_STREAM = 1;

struct Driver {
  Api api{};
  Status status;
  CUresult failure = CUDA_ERROR_NOT_INITIALIZED;  // the code api() reports when CUDA is not available
  pid_t pid = 0;                                   // the process that loaded the driver
};

std::string version_text(int v) { return detail::concat(v / 1000, ".", (v % 1000) / 10); }

std::string error_text_with(const Api& api, CUresult result) {
  const char* name = nullptr;
  if (api.cuGetErrorName == nullptr || api.cuGetErrorName(result, &name) != CUDA_SUCCESS || name == nullptr)
    return detail::concat("CUDA error ", result);
  std::string out = name;
  const char* text = nullptr;
  if (api.cuGetErrorString != nullptr && api.cuGetErrorString(result, &text) == CUDA_SUCCESS && text != nullptr)
    out += detail::concat(" (", text, ")");
  return out;
}

std::string visible_devices_note() {
  const char* v = std::getenv("CUDA_VISIBLE_DEVICES");
  return v == nullptr ? std::string() : detail::concat(" (CUDA_VISIBLE_DEVICES='", v, "')");
}

template <typename Fn>
Fn symbol(void* lib, const char* name) {
  return reinterpret_cast<Fn>(::dlsym(lib, name));
}

Driver load() {
  Driver d;
  d.pid = ::getpid();
  Status& s = d.status;
  const char* env = std::getenv("STOKER_LIBCUDA");
  const bool overridden = env != nullptr && *env != '\0';
  s.library = overridden ? env : "libcuda.so.1";

  // Never dlclose'd: the driver stays mapped for the life of the process, as every user of it expects.
  void* lib = ::dlopen(s.library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    s.reason = detail::concat("the CUDA driver library could not be loaded (", why ? why : s.library.c_str(), ")",
                              overridden ? "; it was named by STOKER_LIBCUDA" : "");
    return d;
  }
  auto get_version = symbol<DriverGetVersion>(lib, "cuDriverGetVersion");
  if (get_version == nullptr) {
    s.reason = detail::concat(s.library, " is not a CUDA driver: it exports no cuDriverGetVersion");
    return d;
  }
  CUresult r = get_version(&s.driver_version);
  if (r != CUDA_SUCCESS) {
    s.reason = detail::concat("cuDriverGetVersion failed with CUDA error ", r);
    d.failure = r;
    return d;
  }
  if (s.driver_version < kMinDriverVersion) {
    s.reason = detail::concat("the CUDA driver is version ", version_text(s.driver_version), "; stoker needs ",
                              version_text(kMinDriverVersion), " or newer");
    return d;
  }

  auto gpa2 = symbol<GetProcAddressV2>(lib, "cuGetProcAddress_v2");
  auto gpa1 = gpa2 ? nullptr : symbol<GetProcAddressV1>(lib, "cuGetProcAddress");
  s.proc_address = gpa2 != nullptr || gpa1 != nullptr;
  std::vector<std::string> missing;
  // `exported` is the name the library exports for that ABI version: only drivers older than 11.3, which have
  // no cuGetProcAddress, are asked for it.
  auto resolve = [&](auto* slot, const char* name, int version, const char* exported) {
    void* fn = nullptr;
    if (gpa2 != nullptr) {
      int found = 0;
      if (gpa2(name, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &found) != CUDA_SUCCESS) fn = nullptr;
    } else if (gpa1 != nullptr) {
      if (gpa1(name, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM) != CUDA_SUCCESS) fn = nullptr;
    } else {
      fn = ::dlsym(lib, exported);
    }
    if (fn == nullptr) missing.push_back(detail::concat(name, "@", version));
    *slot = reinterpret_cast<std::remove_pointer_t<decltype(slot)>>(fn);
  };
  Api& a = d.api;
  resolve(&a.cuGetErrorName, "cuGetErrorName", 6000, "cuGetErrorName");
  resolve(&a.cuGetErrorString, "cuGetErrorString", 6000, "cuGetErrorString");
  resolve(&a.cuInit, "cuInit", 2000, "cuInit");
  resolve(&a.cuDriverGetVersion, "cuDriverGetVersion", 2020, "cuDriverGetVersion");
  resolve(&a.cuDeviceGetCount, "cuDeviceGetCount", 2000, "cuDeviceGetCount");
  resolve(&a.cuDeviceGet, "cuDeviceGet", 2000, "cuDeviceGet");
  resolve(&a.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", 7000, "cuDevicePrimaryCtxRetain");
  resolve(&a.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease", 11000, "cuDevicePrimaryCtxRelease_v2");
  resolve(&a.cuCtxSetCurrent, "cuCtxSetCurrent", 4000, "cuCtxSetCurrent");
  resolve(&a.cuCtxGetCurrent, "cuCtxGetCurrent", 4000, "cuCtxGetCurrent");
  resolve(&a.cuMemHostAlloc, "cuMemHostAlloc", 2020, "cuMemHostAlloc");
  resolve(&a.cuMemFreeHost, "cuMemFreeHost", 2000, "cuMemFreeHost");
  resolve(&a.cuMemHostRegister, "cuMemHostRegister", 6050, "cuMemHostRegister_v2");
  resolve(&a.cuMemHostUnregister, "cuMemHostUnregister", 4000, "cuMemHostUnregister");
  resolve(&a.cuStreamCreate, "cuStreamCreate", 2000, "cuStreamCreate");
  resolve(&a.cuStreamDestroy, "cuStreamDestroy", 4000, "cuStreamDestroy_v2");
  resolve(&a.cuStreamWaitEvent, "cuStreamWaitEvent", 3020, "cuStreamWaitEvent");
  resolve(&a.cuEventCreate, "cuEventCreate", 2000, "cuEventCreate");
  resolve(&a.cuEventRecord, "cuEventRecord", 2000, "cuEventRecord");
  resolve(&a.cuEventQuery, "cuEventQuery", 2000, "cuEventQuery");
  resolve(&a.cuEventSynchronize, "cuEventSynchronize", 2000, "cuEventSynchronize");
  resolve(&a.cuEventDestroy, "cuEventDestroy", 4000, "cuEventDestroy_v2");
  resolve(&a.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync", 3020, "cuMemcpyHtoDAsync_v2");
  const size_t required = missing.size();
  resolve(&a.cuModuleLoadData, "cuModuleLoadData", 2000, "cuModuleLoadData");
  resolve(&a.cuModuleGetFunction, "cuModuleGetFunction", 2000, "cuModuleGetFunction");
  resolve(&a.cuLaunchKernel, "cuLaunchKernel", 4000, "cuLaunchKernel");
  resolve(&a.cuDevicePrimaryCtxGetState, "cuDevicePrimaryCtxGetState", 7000, "cuDevicePrimaryCtxGetState");
  resolve(&a.cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode", 10010,
          "cuThreadExchangeStreamCaptureMode");
  missing.resize(required);  // the kernels' entry points and the two after them are optional
  if (!missing.empty()) {
    std::string names;
    for (const auto& m : missing) names += (names.empty() ? "" : ", ") + m;
    s.reason = detail::concat("the CUDA driver ", version_text(s.driver_version), " (", s.library,
                              ") does not provide ", names);
    return d;
  }

  r = a.cuInit(0);
  if (r != CUDA_SUCCESS) {
    d.failure = r;
    s.reason = detail::concat("cuInit failed: ", error_text_with(a, r), visible_devices_note());
    if (r == CUDA_ERROR_NOT_INITIALIZED)
      s.reason += "; a process forked from one that had initialised CUDA (e.g. through torch) cannot use it: "
                  "start worker processes with 'spawn' or 'forkserver'";
    return d;
  }
  r = a.cuDeviceGetCount(&s.device_count);
  if (r != CUDA_SUCCESS) {
    d.failure = r;
    s.reason = detail::concat("cuDeviceGetCount failed: ", error_text_with(a, r));
    return d;
  }
  if (s.device_count <= 0) {
    d.failure = CUDA_ERROR_NO_DEVICE;
    s.reason = detail::concat("the CUDA driver ", version_text(s.driver_version), " sees no device",
                              visible_devices_note());
    return d;
  }
  s.available = true;
  return d;
}

const Driver& driver() {
  static const Driver d = load();  // thread-safe: concurrent first callers wait for the one loading
  return d;
}

bool forked(const Driver& d) { return ::getpid() != d.pid; }

// Usable for cleanup in this process: loaded and available here (never in a forked child).
bool usable(const Driver& d) { return d.status.available && !forked(d); }

// Relaxes the calling thread's stream-capture mode, its own left in *mode; whether it did (a driver without
// cuThreadExchangeStreamCaptureMode has no graphs to capture either). See ScopedContext.
bool relax_capture(const Api& a, int* mode) noexcept {
  *mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  return a.cuThreadExchangeStreamCaptureMode != nullptr && a.cuThreadExchangeStreamCaptureMode(mode) == CUDA_SUCCESS;
}

// Runs `call` with `ctx` current on this thread (its capture mode relaxed) and restores the thread's context
// and mode after. Never throws: for destructors and deleters, which can only drop a failure.
template <typename Call>
CUresult in_context_noexcept(const PrimaryContext& ctx, Call&& call) noexcept {
  const Driver& d = driver();
  if (!usable(d)) return CUDA_ERROR_DEINITIALIZED;
  CUcontext previous = nullptr;
  CUresult r = d.api.cuCtxGetCurrent(&previous);
  if (r != CUDA_SUCCESS) return r;
  const bool switched = previous != ctx.get();
  if (switched && (r = d.api.cuCtxSetCurrent(ctx.get())) != CUDA_SUCCESS) return r;
  int mode = CU_STREAM_CAPTURE_MODE_RELAXED;  // see ScopedContext
  const bool exchanged = relax_capture(d.api, &mode);
  r = call(d.api);
  if (exchanged) d.api.cuThreadExchangeStreamCaptureMode(&mode);
  if (switched) d.api.cuCtxSetCurrent(previous);
  return r;
}

}  // namespace

Status status() {
  const Driver& d = driver();
  Status s = d.status;
  if (s.available && forked(d)) {
    s.available = false;
    s.reason = detail::concat("CUDA was initialised in process ", d.pid, " and this process (", ::getpid(),
                              ") was forked from it: a forked child cannot use CUDA; start worker processes "
                              "with 'spawn' or 'forkserver'");
  }
  return s;
}

bool available() { return usable(driver()); }

const Api& api() {
  const Driver& d = driver();
  if (!usable(d)) {
    const Status s = status();
    throw CudaError(d.status.available ? CUDA_ERROR_NOT_INITIALIZED : d.failure,
                    detail::concat("CUDA is not available: ", s.reason));
  }
  return d.api;
}

std::vector<int> active_devices() {
  std::vector<int> out;
  const Driver& d = driver();
  if (!usable(d) || d.api.cuDevicePrimaryCtxGetState == nullptr) return out;
  for (int i = 0; i < d.status.device_count; ++i) {
    CUdevice dev = 0;
    unsigned flags = 0;
    int active = 0;
    if (d.api.cuDeviceGet(&dev, i) == CUDA_SUCCESS &&
        d.api.cuDevicePrimaryCtxGetState(dev, &flags, &active) == CUDA_SUCCESS && active)
      out.push_back(i);
  }
  return out;
}

std::string error_text(CUresult result) { return error_text_with(driver().api, result); }

void check(CUresult result, const char* call, const std::string& what) {
  if (result == CUDA_SUCCESS) return;
  throw CudaError(result, detail::concat(call, " failed", what.empty() ? "" : " (", what, what.empty() ? "" : ")",
                                         ": ", error_text(result)));
}

CUcontext current_context() {
  CUcontext ctx = nullptr;
  check(api().cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  return ctx;
}

// ---- PrimaryContext --------------------------------------------------------------------------------------

PrimaryContext::PrimaryContext(int ordinal) : ordinal_(ordinal) {
  const Api& a = api();
  const int count = driver().status.device_count;
  STOKER_CHECK_AS(ValueError, ordinal >= 0 && ordinal < count, "CUDA device ", ordinal, " does not exist: ",
                  count, " device(s) are visible", visible_devices_note());
  check(a.cuDeviceGet(&device_, ordinal), "cuDeviceGet", detail::concat("ordinal ", ordinal));
  check(a.cuDevicePrimaryCtxRetain(&ctx_, device_), "cuDevicePrimaryCtxRetain", detail::concat("device ", ordinal));
}

PrimaryContext::~PrimaryContext() {
  const Driver& d = driver();
  if (ctx_ != nullptr && usable(d)) d.api.cuDevicePrimaryCtxRelease(device_);  // nothing to do on failure
}

void PrimaryContext::make_current() const {
  const Api& a = api();
  CUcontext current = nullptr;
  check(a.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
  if (current != ctx_) check(a.cuCtxSetCurrent(ctx_), "cuCtxSetCurrent", detail::concat("device ", ordinal_));
}

std::shared_ptr<PrimaryContext> primary_context(int ordinal) {
  api();  // a clear error (no driver, forked child) before touching the registry
  // Leaked on purpose (see the header): no driver call from a static destructor at exit.
  static auto* mu = new std::mutex;
  static auto* contexts = new std::map<int, std::shared_ptr<PrimaryContext>>;
  std::lock_guard<std::mutex> lock(*mu);
  auto& slot = (*contexts)[ordinal];
  if (!slot) {
    try {
      slot = std::make_shared<PrimaryContext>(ordinal);
    } catch (...) {
      contexts->erase(ordinal);
      throw;
    }
  }
  return slot;
}

ScopedContext::ScopedContext(const PrimaryContext& ctx) {
  const Api& a = api();
  check(a.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
  if (previous_ != ctx.get()) {
    check(a.cuCtxSetCurrent(ctx.get()), "cuCtxSetCurrent", detail::concat("device ", ctx.ordinal()));
    switched_ = true;
  }
  exchanged_ = relax_capture(a, &capture_mode_);
}

ScopedContext::~ScopedContext() {
  const Driver& d = driver();
  if (!usable(d)) return;
  if (exchanged_) d.api.cuThreadExchangeStreamCaptureMode(&capture_mode_);
  if (switched_) d.api.cuCtxSetCurrent(previous_);
}

// ---- Page-locked memory ----------------------------------------------------------------------------------

void* alloc_pinned(const PrimaryContext& ctx, size_t bytes) {
  STOKER_CHECK_AS(ValueError, bytes > 0, "cannot page-lock 0 bytes");
  ScopedContext scope(ctx);
  void* p = nullptr;
  check(api().cuMemHostAlloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc",
        detail::concat(bytes, " bytes"));
  return p;
}

CUresult free_pinned(const PrimaryContext& ctx, void* ptr) noexcept {
  if (ptr == nullptr || forked(driver())) return CUDA_SUCCESS;
  return in_context_noexcept(ctx, [ptr](const Api& a) { return a.cuMemFreeHost(ptr); });
}

PinnedBuffer::PinnedBuffer(std::shared_ptr<PrimaryContext> ctx, size_t bytes)
    : ctx_(std::move(ctx)), data_(alloc_pinned(*ctx_, bytes)), bytes_(bytes) {}

PinnedBuffer::~PinnedBuffer() { free_pinned(*ctx_, data_); }

HostRegistration::HostRegistration(std::shared_ptr<PrimaryContext> ctx, void* ptr, size_t bytes)
    : ctx_(std::move(ctx)), ptr_(ptr), bytes_(bytes) {
  STOKER_CHECK_AS(ValueError, ptr != nullptr && bytes > 0, "cannot page-lock an empty range");
  ScopedContext scope(*ctx_);
  check(api().cuMemHostRegister(ptr, bytes, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister",
        detail::concat(bytes, " bytes at ", ptr));
}

HostRegistration::~HostRegistration() {
  if (forked(driver())) return;
  void* p = ptr_;
  in_context_noexcept(*ctx_, [p](const Api& a) { return a.cuMemHostUnregister(p); });
}

// ---- Streams and events ----------------------------------------------------------------------------------

Stream::Stream(std::shared_ptr<PrimaryContext> ctx) : ctx_(std::move(ctx)) {
  ScopedContext scope(*ctx_);
  check(api().cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate",
        detail::concat("device ", ctx_->ordinal()));
}

Stream::~Stream() {
  CUstream s = stream_;
  in_context_noexcept(*ctx_, [s](const Api& a) { return a.cuStreamDestroy(s); });
}

void Stream::copy_to_device(CUdeviceptr dst, const void* src, size_t bytes) const {
  ScopedContext scope(*ctx_);
  check(api().cuMemcpyHtoDAsync(dst, src, bytes, stream_), "cuMemcpyHtoDAsync", detail::concat(bytes, " bytes"));
}

void Stream::wait(const Event& event) const {
  ScopedContext scope(*ctx_);
  check(api().cuStreamWaitEvent(stream_, event.get(), 0), "cuStreamWaitEvent");
}

Event::Event(std::shared_ptr<PrimaryContext> ctx) : ctx_(std::move(ctx)) {
  ScopedContext scope(*ctx_);
  check(api().cuEventCreate(&event_, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
}

Event::~Event() {
  CUevent e = event_;
  in_context_noexcept(*ctx_, [e](const Api& a) { return a.cuEventDestroy(e); });
}

void Event::record(CUstream stream) const {
  ScopedContext scope(*ctx_);
  check(api().cuEventRecord(event_, stream), "cuEventRecord");
}

bool Event::query() const {
  ScopedContext scope(*ctx_);
  const CUresult r = api().cuEventQuery(event_);
  if (r == CUDA_ERROR_NOT_READY) return false;
  check(r, "cuEventQuery");
  return true;
}

void Event::synchronize() const {
  ScopedContext scope(*ctx_);
  check(api().cuEventSynchronize(event_), "cuEventSynchronize");
}

void Event::block_stream(CUstream stream) const {
  ScopedContext scope(*ctx_);
  check(api().cuStreamWaitEvent(stream, event_, 0), "cuStreamWaitEvent");
}

}  // namespace stoker::cuda
